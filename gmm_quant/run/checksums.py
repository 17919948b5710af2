"""A checksum of a pytree computed where its arrays live: the same value for any sharding or process count.

``tree_checksum(tree)`` runs a jitted program over each leaf: each element's bit pattern is mixed
with its global position (murmur3's 32-bit finaliser) and summed modulo 2^32, in two lanes with
different seeds. A sum modulo 2^32 does not depend on the order it is taken in, so XLA may split the
reduction over any mesh (each device sums its block, one all-reduce of a few integers): nothing is
gathered, and a checkpoint written by 4 processes verifies in 1 and the other way round. Leaves that
are numpy arrays or Python scalars take part as replicated values.

Invariants (tests/test_checksums.py): equal trees give equal checksums whatever their sharding; changing
one element's bits, a leaf's path, dtype or shape, or swapping two elements changes the checksum;
``finite`` is whether every floating element is finite. It detects damage, it is not a cryptographic
hash: files are sha256'd separately (``checkpoint.py``).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from gmm_quant._util.hosts import to_local

LANES = (0x9E3779B9, 0x27D4EB2F)  # two 32-bit sums: 64 bits against accidental damage
PREFIX = "c1:"  # the checksum's version, so a META file says which function verifies it


def _fmix(x, xp=jnp):
    """murmur3's 32-bit finaliser: a bijection on uint32 that mixes every bit into every other."""
    x = x ^ (x >> 16)
    x = x * xp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * xp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _bits(leaf, xp=jnp):
    """The element bit patterns as uint32 (narrower types widened, bool as 0/1)."""
    dtype = np.dtype(leaf.dtype)
    if dtype == np.bool_:
        return leaf.astype(xp.uint32)
    if xp is np:
        view = {4: np.uint32, 2: np.uint16, 1: np.uint8}.get(dtype.itemsize, np.uint32)
        raw = np.ascontiguousarray(leaf).view(view)
        raw = raw.reshape(*leaf.shape, 2) if dtype.itemsize == 8 else raw
    else:
        view = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}.get(dtype.itemsize, jnp.uint32)
        raw = jax.lax.bitcast_convert_type(leaf, view)  # 8 bytes: [..., 2]
    if dtype.itemsize == 8:
        return raw[..., 0] ^ _fmix(raw[..., 1] + xp.uint32(0x9E3779B9), xp)
    return raw.astype(xp.uint32)


def _leaf_sums(leaf, xp=jnp):
    """``(uint32[2] lanes, finite)`` of one leaf, in jnp (jitted, where the leaf lives) or numpy."""
    bits = _bits(leaf, xp)
    if xp is np:
        position = np.arange(bits.size, dtype=np.uint32).reshape(bits.shape)
    else:
        position = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else jnp.uint32(0)
        for d in range(1, bits.ndim):
            position = position * jnp.uint32(bits.shape[d]) + jax.lax.broadcasted_iota(
                jnp.uint32, bits.shape, d
            )
    place = _fmix(position * xp.uint32(0x9E3779B1), xp)
    lanes = [xp.sum(_fmix(bits ^ (place + xp.uint32(s)), xp), dtype=xp.uint32) for s in LANES]
    finite = xp.all(xp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else True
    return xp.stack(lanes), finite


_leaf_sums_jit = jax.jit(_leaf_sums)  # compiled once per leaf shape, dtype and layout: shared by every tree
SMALL = 1 << 16  # a leaf this small held by this process alone is summed by numpy: nothing to compile


def _sums(leaf):
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable and leaf.size <= SMALL):
        return _leaf_sums_jit(leaf)
    host = np.asarray(leaf)
    return _leaf_sums(host.astype(jax.dtypes.canonicalize_dtype(host.dtype)), np)  # as jit would see it


def tree_checksum(tree) -> tuple[str, bool]:
    """``(checksum, finite)`` of ``tree``: a layout-independent digest and whether it is all finite.

    With several processes every process must call it (one collective program) on the same tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = [_sums(leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)) for _, leaf in flat]
    digest, finite = hashlib.sha256(), True
    for (path, leaf), (lanes, ok) in zip(flat, sums, strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}|{jnp.dtype(leaf.dtype)}|{tuple(leaf.shape)}|".encode())
        digest.update(np.asarray(to_local(lanes)).astype("<u4").tobytes())
        finite = finite and bool(to_local(ok))
    return PREFIX + digest.hexdigest(), finite
