"""Attention heads: importance scores, masking, and structural pruning of ``nnx.MultiHeadAttention``.

A head ``h`` of an attention layer owns the slices ``[:, h, :]`` of its query, key and value kernels
(``[in, heads, head_dim]``), ``[h, :]`` of their biases and ``[h, :, :]`` of the output kernel
(``[heads, head_dim, out]``). Its output is ``softmax(q_h k_h^T / sqrt(d)) v_h W_out,h``, added to the
others' and the output bias, so:

* **masking** a head zeroes its value and output slices: its term is exactly 0;
* **pruning** it removes those slices (and its query/key slices) and shrinks the module's head count,
  so the pruned model computes what the masked model computes with fewer multiply-adds and weights.

Scores: ``weight_scores`` — the Frobenius norm of the head's Q, K and V slices together (no data);
``loss_scores`` — the increase of a loss (e.g. validation cross-entropy) when the head alone is masked.
``select_heads`` keeps, per layer, the heads whose score reaches ``threshold`` x the layer's largest
(or drops the ``ratio`` lowest) and refuses a selection that would remove every head of a layer.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from gmm_quant.core.rules import path_str


def attention_layers(model) -> dict:
    """{path: nnx.MultiHeadAttention} of every attention module in ``model``, in graph order."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.MultiHeadAttention):
            out[path_str(path)] = node
    return out


def weight_scores(model) -> dict:
    """{layer: [heads] array}: the norm of each head's query, key and value kernel slices."""
    scores = {}
    for path, attn in attention_layers(model).items():
        parts = [np.asarray(getattr(attn, n).kernel[...]) for n in ("query", "key", "value")]
        scores[path] = np.sqrt(sum((p**2).sum(axis=(0, 2)) for p in parts))
    return scores


def mask_heads(model, masked: dict) -> None:
    """Zero the value and output slices of the heads ``{layer: [indices]}`` in place."""
    layers = attention_layers(model)
    for path, heads in masked.items():
        attn, heads = layers[path], list(heads)
        kernel = attn.value.kernel[...]
        attn.value.kernel[...] = kernel.at[:, heads, :].set(0.0)
        if attn.value.bias is not None:
            attn.value.bias[...] = attn.value.bias[...].at[heads, :].set(0.0)
        attn.out.kernel[...] = attn.out.kernel[...].at[heads, :, :].set(0.0)


def loss_scores(model, loss_fn) -> dict:
    """{layer: [heads]}: ``loss_fn(model)`` with the head masked minus without (higher = needed)."""
    base = float(loss_fn(model))
    scores = {}
    for path, attn in attention_layers(model).items():
        row = []
        for h in range(attn.num_heads):
            trial = nnx.clone(model)
            mask_heads(trial, {path: [h]})
            row.append(float(loss_fn(trial)) - base)
        scores[path] = np.asarray(row)
    return scores


def select_heads(scores: dict, *, threshold: float | None = None, ratio: float | None = None) -> dict:
    """{layer: sorted indices kept}: score >= threshold * the layer's largest, or all but the
    ``round(ratio * heads)`` lowest. Raises ValueError naming a layer that would keep no head."""
    if (threshold is None) == (ratio is None):
        raise ValueError("give exactly one of threshold and ratio")
    keep = {}
    for path, s in scores.items():
        s = np.asarray(s, float)
        if threshold is not None:
            kept = np.flatnonzero(s >= threshold * s.max()) if s.max() > 0 else np.array([], int)
        else:
            drop = round(ratio * s.size)
            kept = np.sort(np.argsort(s, kind="stable")[drop:])
        if kept.size == 0:
            raise ValueError(f"head pruning would remove every head of attention layer {path!r}")
        keep[path] = [int(i) for i in kept]
    return keep


def prune_heads(model, keep: dict) -> None:
    """Remove, in place, every head not listed in ``keep`` ({layer: indices}) from its layer."""
    layers = attention_layers(model)
    for path, kept in keep.items():
        attn, kept = layers[path], list(kept)
        if len(kept) == attn.num_heads:
            continue
        for name in ("query", "key", "value"):
            proj = getattr(attn, name)
            proj.kernel = nnx.Param(proj.kernel[...][:, kept, :])
            if proj.bias is not None:
                proj.bias = nnx.Param(proj.bias[...][kept, :])
            proj.out_features = (len(kept), attn.head_dim)
        attn.out.kernel = nnx.Param(attn.out.kernel[...][kept, :, :])
        attn.out.in_features = (len(kept), attn.head_dim)
        attn.num_heads = attn.num_kv_heads = len(kept)
        attn.qkv_features = len(kept) * attn.head_dim


def heads_kept(model) -> dict:
    """{layer: number of heads} of every attention layer."""
    return {path: attn.num_heads for path, attn in attention_layers(model).items()}


def fit_heads(model, shapes: dict) -> None:
    """Cut, in place, each attention layer to the head count of the stored ``shapes`` ({path: shape}
    of its ``query/kernel``), keeping its first heads: a template for loading a pruned model."""
    for path, attn in attention_layers(model).items():
        shape = shapes.get(f"{path}/query/kernel")
        if shape is not None and len(shape) == 3 and shape[1] < attn.num_heads:
            prune_heads(model, {path: range(shape[1])})
