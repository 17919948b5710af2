"""A small character-level language model: a decoder-only transformer with a causal mask.

Tokens ``int32 [B, L]`` (ASCII codes, ``L <= context``) are embedded (``nnx.Embed``), learned
position embeddings added; ``depth`` pre-norm blocks (the ViT's ``Block``: multi-head
self-attention, here causally masked, and a GELU MLP) and a final LayerNorm follow; ``head`` gives
logits ``[B, L, vocab]`` for the next character at every position. Parameter paths: ``embed``,
``position``, ``blocks/<i>/attn/{query,key,value,out}``, ``blocks/<i>/mlp_in``,
``blocks/<i>/mlp_out``, ``norm``, ``head``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from models.vit import Block


class CharLM(nnx.Module):
    def __init__(self, *, vocab=128, context=64, width=128, depth=4, heads=4, mlp_ratio=2, rngs: nnx.Rngs):
        self.context = context
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.position = nnx.Param(jax.random.normal(rngs.params(), (context, width)) * 0.02)
        self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"sequence of {length} tokens is longer than the context of {self.context}")
        h = self.embed(tokens) + self.position[:length]
        mask = np.tril(np.ones((length, length), bool))[None, None]  # a constant: position i sees j <= i
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


def charlm_pydoc(*, rngs: nnx.Rngs) -> CharLM:
    """Python's help topics: 64 characters of context, width 128, 4 heads, 4 blocks, MLP 256."""
    return CharLM(context=64, width=128, depth=4, heads=4, mlp_ratio=2, rngs=rngs)


def charlm_tiny(*, rngs: nnx.Rngs) -> CharLM:
    """Tests: width 32, 2 blocks."""
    return CharLM(context=64, width=32, depth=2, heads=4, mlp_ratio=2, rngs=rngs)
