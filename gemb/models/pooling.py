"""Pool token states into one vector per segment (per packed example), padding excluded.

All poolers take hidden [B, L, D] and segment_ids [B, L] (0 = padding, 1..S = the examples of
the row) and return [B, S, D]. Slots of a row that hold no example come back as zeros; the
encoder reports them in its segment mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_membership(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[B, L, S] float32 one-hot: token l belongs to segment s + 1."""
    return (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)


def mean_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    membership = segment_membership(segment_ids, num_segments)
    # Sum in float32 whatever the compute dtype: a bf16 sum over thousands of tokens loses bits.
    totals = jnp.einsum("bls,bld->bsd", membership, hidden.astype(jnp.float32))
    counts = membership.sum(axis=1)[..., None]
    return totals / jnp.maximum(counts, 1.0)


def _pick_token(hidden, segment_ids, num_segments, pick_last: bool):
    membership = segment_membership(segment_ids, num_segments)  # [B, L, S]
    index = jnp.arange(segment_ids.shape[1])[None, :, None]
    if pick_last:
        chosen = jnp.max(jnp.where(membership > 0, index, -1), axis=1)
    else:
        chosen = jnp.min(jnp.where(membership > 0, index, segment_ids.shape[1]), axis=1)
    present = membership.sum(axis=1) > 0
    chosen = jnp.clip(chosen, 0, segment_ids.shape[1] - 1)
    picked = jnp.take_along_axis(hidden.astype(jnp.float32), chosen[..., None], axis=1)
    return jnp.where(present[..., None], picked, 0.0)


def last_token_pool(hidden, segment_ids, num_segments):
    return _pick_token(hidden, segment_ids, num_segments, pick_last=True)


def first_token_pool(hidden, segment_ids, num_segments):
    return _pick_token(hidden, segment_ids, num_segments, pick_last=False)


POOLERS = {"mean": mean_pool, "last_token": last_token_pool, "first_token": first_token_pool}
