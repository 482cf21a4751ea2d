"""Attention masks and grouped-query attention with QK-norm.

Masks are boolean [batch, query, key] arrays built once per forward pass and shared by all
layers of one type. Segment ids (0 = padding, 1.. = packed examples) keep packed examples apart.
Local layers see keys within `window_reach` tokens: one-sided (0 <= i - j <= reach) in causal
mode, as in the Gemma 3 LM, and symmetric (|i - j| <= reach) in bidirectional mode; see
TransformerConfig.bidirectional_window for how the reach is chosen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.models import layers
from gemb.models.config import AttentionType, TransformerConfig
from gemb.partitioning.partitioner import constrain

# Finite, so a padding query whose keys are all masked gives a harmless uniform row, not NaN.
_MASKED_LOGIT = -2.3819763e38


def attention_masks(segment_ids: jax.Array, mode: str, window_reach: int
                    ) -> dict[str, jax.Array]:
    """Boolean [B, T, S] masks for global and local (sliding-window) layers, by type value."""
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_is_token = (segment_ids != 0)[:, None, :]
    allowed = same_segment & key_is_token
    index = jnp.arange(segment_ids.shape[1])
    offset = index[:, None] - index[None, :]  # query index minus key index
    if mode == "causal":
        allowed = allowed & (offset >= 0)[None]
        window = offset <= window_reach
    elif mode == "bidirectional":
        window = jnp.abs(offset) <= window_reach
    else:
        raise ValueError(f"attention mode {mode!r}; use 'bidirectional' or 'causal'.")
    return {AttentionType.GLOBAL.value: allowed,
            AttentionType.LOCAL_SLIDING.value: allowed & window[None]}


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 in every segment (padding gets 0)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(segment_ids != 0, index - segment_start, 0).astype(jnp.int32)


class Attention(nn.Module):
    config: TransformerConfig
    attention_type: AttentionType

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        # Upstream Gemma nests each kernel in its own einsum module ({"q_einsum": {"w": ...}}).
        q_kernel = self._einsum_param("q_einsum", ("heads", "embed", "head_dim"),
                                      (cfg.num_heads, cfg.embed_dim, cfg.head_dim))
        kv_kernel = self._einsum_param("kv_einsum", (None, "kv_heads", "embed", "head_dim"),
                                       (2, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim))
        out_kernel = self._einsum_param("attn_vec_einsum", ("heads", "head_dim", "embed"),
                                        (cfg.num_heads, cfg.head_dim, cfg.embed_dim))

        query = jnp.einsum("btd,ndh->btnh", x, q_kernel)
        query = constrain(query, ("act_batch", "act_length", "act_heads", None))
        key = jnp.einsum("bsd,kdh->bskh", x, kv_kernel[0])
        value = jnp.einsum("bsd,kdh->bskh", x, kv_kernel[1])

        query = layers.RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="_query_norm")(query)
        key = layers.RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="_key_norm")(key)
        if self.attention_type == AttentionType.GLOBAL:
            base, scale_factor = cfg.global_rope_base, cfg.global_rope_scale_factor
        else:
            base, scale_factor = cfg.local_rope_base, 1.0
        query = layers.apply_rope(query, positions, base, scale_factor)
        key = layers.apply_rope(key, positions, base, scale_factor)
        query = query * jnp.asarray(cfg.query_scale, query.dtype)

        batch, length, _, head_dim = query.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        grouped_query = query.reshape(batch, length, cfg.num_kv_heads, groups, head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", grouped_query, key).astype(jnp.float32)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        encoded = jnp.einsum("bkgts,bskh->btkgh", probs, value)
        encoded = encoded.reshape(batch, length, cfg.num_heads, head_dim)
        return jnp.einsum("btnh,nhd->btd", encoded, out_kernel)

    def _einsum_param(self, module_name: str, axes, shape) -> jax.Array:
        return _EinsumKernel(axes, shape, self.config.param_dtype, name=module_name)().astype(
            self.config.dtype)


class _EinsumKernel(nn.Module):
    """Holds one kernel named "w", mirroring upstream Gemma's Einsum module."""

    axes: tuple
    shape: tuple
    param_dtype: str

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("w", nn.with_logical_partitioning(layers._kernel_init, self.axes),
                          self.shape, jnp.dtype(self.param_dtype))
