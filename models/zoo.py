"""The layer zoo: one small model per family of Flax NNX's standard layers (random weights).

``ZOO[name] = (factory, input)`` where ``input`` is one example's shape, or ``"tokens"`` for int32 token
ids in 0..49 of length 5. Every model returns [batch, 10] logits. Used by tests/test_zoo.py (ONNX export
parity) and bench/zoo_export.py (export time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

R = nnx.Rngs(0)


class Seq(nnx.Module):
    """Layers applied in turn, then a flattening dense head: every zoo model ends in [B, 10] logits."""

    def __init__(self, *layers, head_in: int, rngs=R):
        self.layers = nnx.List(list(layers))
        self.head = nnx.Linear(head_in, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x.reshape(x.shape[0], -1))


class Fn(nnx.Module):
    """A parameter-free function as a layer (activations, pooling, reshapes)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Attention(nnx.Module):
    def __init__(self, masked: bool, causal: bool = False):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=R)
        self.masked, self.causal = masked, causal

    def __call__(self, x):
        if not self.masked:
            return self.attn(x)
        if self.causal:
            return self.attn(x, mask=nnx.make_causal_mask(x[..., 0]))
        keep = x[..., :1] > -0.5  # a padding mask computed from the input
        return self.attn(x, mask=nnx.make_attention_mask(keep[..., 0], keep[..., 0]))


class Embedder(nnx.Module):
    def __init__(self):
        self.embed = nnx.Embed(50, 8, rngs=R)
        self.norm = nnx.LayerNorm(8, rngs=R)
        self.head = nnx.Linear(8, 10, rngs=R)

    def __call__(self, tokens):
        return self.head(self.norm(self.embed(tokens)).mean(axis=1))


class Einsum(nnx.Module):
    """A 3-d kernel (heads x in x out) used with batch dimensions: einsum-style dot_general."""

    def __init__(self):
        self.kernel = nnx.Param(jax.random.normal(jax.random.key(1), (2, 8, 5)) * 0.3)
        self.head = nnx.Linear(2 * 6 * 5, 10, rngs=R)

    def __call__(self, x):  # x [B, 6, 8]
        per_head = jnp.einsum("bld,hde->bhle", x, self.kernel)
        return self.head(jax.nn.gelu(per_head).reshape(x.shape[0], -1))


class Tensors(nnx.Module):
    """concatenate / split / slicing / transpose / where / reductions over several axes."""

    def __init__(self):
        self.dense = nnx.Linear(8, 8, rngs=R)
        self.head = nnx.Linear(6 + 4 + 6, 10, rngs=R)

    def __call__(self, x):  # [B, 6, 8]
        h = self.dense(x)
        a, b = jnp.split(h, 2, axis=-1)
        c = jnp.concatenate([jnp.where(a > 0, a, 0.1 * b), b[:, ::2]], axis=1)  # [B, 9, 4]
        t = jnp.transpose(c, (0, 2, 1))  # [B, 4, 9]
        feats = [t.max(axis=2)[:, :4].reshape(-1, 4)[:, :4], jnp.mean(h, axis=(2,)), jnp.min(x, axis=2)]
        return self.head(jnp.concatenate([feats[2], feats[0], feats[1]], axis=1))


def _image(c=1):
    return (8, 8, c)


ZOO = {
    "linear": (lambda: Seq(nnx.Linear(64, 32, rngs=R), Fn(jax.nn.relu), head_in=32), (64,)),
    "conv2d_strides_same": (
        lambda: Seq(nnx.Conv(1, 4, (3, 3), strides=2, padding="SAME", rngs=R), head_in=64),
        _image(),
    ),
    "conv2d_valid_dilated": (
        lambda: Seq(nnx.Conv(1, 4, (3, 3), padding="VALID", kernel_dilation=2, rngs=R), head_in=64),
        _image(),
    ),
    "conv2d_groups_circular": (
        lambda: Seq(nnx.Conv(4, 8, (3, 3), padding="CIRCULAR", feature_group_count=2, rngs=R), head_in=512),
        _image(4),
    ),
    "conv1d": (lambda: Seq(nnx.Conv(3, 4, (3,), strides=2, padding="SAME", rngs=R), head_in=16), (8, 3)),
    "conv_transpose": (
        lambda: Seq(nnx.ConvTranspose(2, 3, (3, 3), strides=(2, 2), rngs=R), head_in=768),
        _image(2),
    ),
    "pooling": (
        lambda: Seq(
            nnx.Conv(1, 4, (3, 3), rngs=R),
            Fn(lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))),
            Fn(lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(1, 1), padding="SAME")),
            Fn(lambda x: nnx.min_pool(x, window_shape=(2, 2), strides=(2, 2))),
            head_in=16,
        ),
        _image(),
    ),
    "batchnorm": (
        lambda: Seq(
            nnx.Conv(1, 4, (3, 3), rngs=R), nnx.BatchNorm(4, use_running_average=True, rngs=R), head_in=256
        ),
        _image(),
    ),
    "layernorm_rmsnorm_groupnorm": (
        lambda: Seq(
            nnx.Linear(16, 8, rngs=R),
            nnx.LayerNorm(8, rngs=R),
            nnx.RMSNorm(8, rngs=R),
            Fn(lambda x: x.reshape(-1, 2, 2, 2)),
            nnx.GroupNorm(2, num_groups=2, rngs=R),
            head_in=8,
        ),
        (16,),
    ),
    "dropout_inference": (
        lambda: Seq(nnx.Linear(16, 8, rngs=R), nnx.Dropout(0.5, deterministic=True, rngs=R), head_in=8),
        (16,),
    ),
    "embed": (Embedder, "tokens"),
    "attention": (lambda: Seq(Attention(masked=False), head_in=48), (6, 8)),
    "attention_padding_mask": (lambda: Seq(Attention(masked=True), head_in=48), (6, 8)),
    "attention_causal_mask": (lambda: Seq(Attention(masked=True, causal=True), head_in=48), (6, 8)),
    "activations": (
        lambda: Seq(
            nnx.Linear(16, 16, rngs=R),
            Fn(
                lambda x: jnp.concatenate(
                    [
                        jax.nn.relu(x),
                        jax.nn.gelu(x, approximate=False),
                        jax.nn.gelu(x, approximate=True),
                        jax.nn.silu(x),
                        jax.nn.sigmoid(x),
                        jnp.tanh(x),
                        jax.nn.softmax(x),
                        jax.nn.log_softmax(x),
                    ],
                    axis=-1,
                )
            ),
            head_in=128,
        ),
        (16,),
    ),
    "einsum_3d_kernel": (Einsum, (6, 8)),
    "tensor_ops": (Tensors, (6, 8)),
}
