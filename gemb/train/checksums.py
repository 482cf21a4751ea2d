"""Content checksums of array trees and JSON records, so a restore can prove what it read.

orbax/tensorstore read a flipped bit in a compressed chunk back as a silently different value
as often as not, so every checkpoint records, in its meta item, a checksum of every array it
holds, computed from the arrays themselves just before they are saved, and restore recomputes
them. Checksums of the values (not of the files) are what a sharded, multi-host checkpoint
needs: each process writes only its shards' files, but every process can compute the checksum
of a global array under jit, and the result does not depend on the sharding, the file layout
or the storage (local disk or gs://).

The checksum of an array is two sums, modulo 2**32, of its elements' bit patterns (as uint32)
times odd position weights. Modular sums do not depend on the order of the reduction, so any
sharding gives the same value, and one flipped bit changes a sum by +-2**k times an odd number,
which is never 0 modulo 2**32: a single-bit error is always detected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_WEIGHT_A = np.uint32(2654435761)  # Knuth's multiplicative hash constant (odd)
_WEIGHT_B = np.uint32(2246822519)  # xxHash's PRIME32_2 (odd)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bit pattern of every element as uint32, in x's own shape (64-bit types: a trailing
    axis of two words). Never reshaped: a sharded array stays sharded (see _array_checksum)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major flat index (mod 2**32), built from per-axis iotas."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _array_checksum(x: jax.Array) -> jax.Array:
    # Weights come from each element's flat index, computed from iotas in the array's own shape:
    # flattening a sharded array first (reshape(-1)) made XLA gather it whole onto every device
    # (a 270M model's state on 8 CPU devices: 24 GB at the first save); elementwise work and a
    # sum keep each device on its own shard. The values are those of the flattened form.
    words = _as_uint32(x)
    odd = _flat_index(words.shape) * np.uint32(2) + np.uint32(1)
    sum_a = jnp.sum(words * (odd * _WEIGHT_A), dtype=jnp.uint32)
    sum_b = jnp.sum((words ^ (words >> 15)) * (odd * _WEIGHT_B), dtype=jnp.uint32)
    return jnp.stack([sum_a, sum_b])


@jax.jit
def _tree_checksums(tree):
    return jax.tree.map(_array_checksum, tree)


def leaf_name(path) -> str:
    """"params/encoder/head/kernel" or "opt_state/1/0/mu/...": a tree path as a slash path."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_checksums(tree: Any) -> dict[str, str]:
    """{"params/encoder/...": "89ab12cd-01234567"} for every array leaf of a tree."""
    if not jax.tree.leaves(tree):
        return {}
    sums = jax.device_get(_tree_checksums(tree))
    return {leaf_name(path): f"{int(value[0]):08x}-{int(value[1]):08x}"
            for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def mismatches(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two checksum tables ([] when they agree)."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            out.append(f"{name}: missing from what was read")
        elif name not in expected:
            out.append(f"{name}: not in the saved checksums")
        elif expected[name] != actual[name]:
            out.append(f"{name}: saved {expected[name]}, read {actual[name]}")
    return out


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a JSON record's canonical form (sorted keys, no whitespace)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
