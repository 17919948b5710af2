"""A small Vision Transformer (Dosovitskiy et al., 2021) for MNIST-sized images, in Flax NNX.

Images ``[B, H, W, C]`` are cut into ``patch x patch`` patches, each linearly embedded; a learned
class token is prepended and learned position embeddings added; ``depth`` pre-norm blocks of
multi-head self-attention (``nnx.MultiHeadAttention``) and a GELU MLP follow; the class token's final
LayerNorm output is classified. Parameter paths: ``embed``, ``cls``, ``position``,
``blocks/<i>/attn/{query,key,value,out}``, ``blocks/<i>/mlp_in``, ``blocks/<i>/mlp_out``, ``head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, h, mask=None):
        h = h + self.attn(self.norm1(h), mask=mask)
        return h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(h)), approximate=False))


class ViT(nnx.Module):
    def __init__(self, *, image=28, channels=1, patch=7, width=64, depth=4, heads=4, mlp_ratio=2,
                 classes=10, rngs: nnx.Rngs):  # fmt: skip
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of the patch size {patch}")
        self.patch, self.tokens = patch, (image // patch) ** 2
        self.embed = nnx.Linear(patch * patch * channels, width, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, width)))
        self.position = nnx.Param(jax.random.normal(rngs.params(), (self.tokens + 1, width)) * 0.02)
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def patches(self, x):
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def __call__(self, x):
        tokens = self.embed(self.patches(x))
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, tokens.shape[-1]))
        h = jnp.concatenate([cls, tokens], axis=1) + self.position[...]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def vit_mnist(*, rngs: nnx.Rngs) -> ViT:
    """28x28 MNIST: 7x7 patches -> 16 tokens + class token, width 64, 4 heads, 4 blocks, MLP 128."""
    return ViT(image=28, patch=7, width=64, depth=4, heads=4, mlp_ratio=2, rngs=rngs)


def vit_digits(*, rngs: nnx.Rngs) -> ViT:
    """8x8 digits (tests, quick starts): 4x4 patches -> 4 tokens + class token, width 32, 2 blocks."""
    return ViT(image=8, patch=4, width=32, depth=2, heads=4, mlp_ratio=2, rngs=rngs)
