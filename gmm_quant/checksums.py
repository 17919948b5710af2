"""A checksum of a pytree computed where its arrays live: the same value for any sharding or process count.

``tree_checksum(tree)`` runs one jitted program over every leaf: each element's bit pattern is mixed
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

LANES = (0x9E3779B9, 0x27D4EB2F)  # two 32-bit sums: 64 bits against accidental damage
PREFIX = "c1:"  # the checksum's version, so a META file says which function verifies it


def _fmix(x):
    """murmur3's 32-bit finaliser: a bijection on uint32 that mixes every bit into every other."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _bits(leaf) -> jax.Array:
    """The element bit patterns as uint32 (narrower types widened, bool as 0/1)."""
    dtype = jnp.dtype(leaf.dtype)
    if dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    if dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    if dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint16).astype(jnp.uint32)
    if dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(leaf, jnp.uint8).astype(jnp.uint32)
    halves = jax.lax.bitcast_convert_type(leaf, jnp.uint32)  # 8 bytes: [..., 2]
    return halves[..., 0] ^ _fmix(halves[..., 1] + jnp.uint32(0x9E3779B9))


def _leaf_sums(leaf):
    """``(uint32[2] lanes, finite)`` of one leaf."""
    bits = _bits(leaf)
    position = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else jnp.uint32(0)
    for d in range(1, bits.ndim):
        position = position * jnp.uint32(bits.shape[d]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
    place = _fmix(position * jnp.uint32(0x9E3779B1))
    lanes = [jnp.sum(_fmix(bits ^ (place + jnp.uint32(s))), dtype=jnp.uint32) for s in LANES]
    finite = jnp.all(jnp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


@jax.jit
def _sums(leaves):
    return [_leaf_sums(leaf) for leaf in leaves]


def _host(x) -> np.ndarray:
    """A replicated result as numpy on any process (each holds the whole value)."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def tree_checksum(tree) -> tuple[str, bool]:
    """``(checksum, finite)`` of ``tree``: a layout-independent digest and whether it is all finite.

    With several processes every process must call it (one collective program) on the same tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in flat]
    sums = _sums(leaves) if leaves else []
    digest, finite = hashlib.sha256(), True
    for (path, leaf), (lanes, ok) in zip(flat, sums, strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}|{jnp.dtype(leaf.dtype)}|{tuple(leaf.shape)}|".encode())
        digest.update(_host(lanes).astype("<u4").tobytes())
        finite = finite and bool(_host(ok))
    return PREFIX + digest.hexdigest(), finite
