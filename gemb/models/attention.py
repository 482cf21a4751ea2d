"""Grouped-query attention with QK-norm, and what each layer may attend.

Segment ids (0 = padding, 1.. = packed examples) keep packed examples apart. Local layers see
keys within `window_reach` tokens: one-sided (0 <= i - j <= reach) in causal mode, as in the
Gemma 3 LM, and symmetric (|i - j| <= reach) in bidirectional mode; see
TransformerConfig.bidirectional_window for how the reach is chosen. How the scores are computed
(dense, blockwise, a fused kernel) is TransformerConfig.attention_backend's choice
(gemb/models/attention_backends.py); the dense backend's boolean [batch, query, key] masks are
built once per forward pass and shared by all layers of one type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.models import attention_backends, layers
from gemb.models.config import AttentionType, TransformerConfig
from gemb.partitioning.partitioner import constrain


def layer_spec(config: TransformerConfig, attention_type: AttentionType
               ) -> attention_backends.LayerSpec:
    """What a layer of this type attends (mode and window), with the config's block size."""
    reach = config.local_window_reach if attention_type == AttentionType.LOCAL_SLIDING else None
    return attention_backends.LayerSpec(config.attention_mode, reach, config.attention_block_size)


def attention_masks(segment_ids: jax.Array, mode: str, window_reach: int
                    ) -> dict[str, jax.Array]:
    """Boolean [B, T, S] masks for global and local (sliding-window) layers, by type value."""
    return {AttentionType.GLOBAL.value: attention_backends.layer_mask(
                segment_ids, attention_backends.LayerSpec(mode, None)),
            AttentionType.LOCAL_SLIDING.value: attention_backends.layer_mask(
                segment_ids, attention_backends.LayerSpec(mode, window_reach))}


def attention_inputs(config: TransformerConfig, segment_ids: jax.Array, packed: bool
                     ) -> dict[str, jax.Array]:
    """What every layer's attention reads: the segment ids; the dense mask of each layer type
    the 'xla' backend computes (built once here, not once per layer); and, for rows that each
    hold one example from column 0 on (packed=False), their lengths: its presence is what tells
    the layers (statically: it is part of the tree's structure) that the cudnn path applies."""
    inputs = {"segment_ids": segment_ids}
    if not packed:
        inputs["row_lengths"] = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    for attention_type in set(config.layer_attention_types()):
        spec = layer_spec(config, attention_type)
        if attention_backends.resolve_backend(config.attention_backend, spec, packed,
                                              segment_ids.shape[1]) == "xla":
            inputs[attention_type.value] = attention_backends.layer_mask(segment_ids, spec)
    return inputs


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
    def __call__(self, x: jax.Array, positions: jax.Array, inputs: dict[str, jax.Array],
                 cache: dict[str, jax.Array] | None = None):
        """inputs: `attention_inputs` (segment ids, dense masks, row lengths), plus in decoding
        "cache_index" and "cache_segments" (`decoding_inputs`).

        cache: this layer's {"key", "value"} [B, S_max, K, H] when decoding: the new tokens'
        keys and values are written at cache_index and the queries attend over the cache; the
        result is then (output, new cache)."""
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

        spec = layer_spec(cfg, self.attention_type)
        if cache is not None:
            return self._attend_cache(query, key, value, inputs, spec, cache, out_kernel)
        encoded = attention_backends.attend(
            query, key, value, inputs["segment_ids"], spec,
            cfg.attention_backend, packed="row_lengths" not in inputs,
            mask=inputs.get(self.attention_type.value))
        return jnp.einsum("btnh,nhd->btd", encoded.astype(value.dtype), out_kernel)

    def _attend_cache(self, query, key, value, inputs, spec, cache, out_kernel):
        """The new tokens' queries against every cached key (dense: T is the prompt in the
        prefill and 1 per decoding step, so the scores are [T, S_max] per row)."""
        index = inputs["cache_index"]
        new_cache = {name: jax.lax.dynamic_update_slice_in_dim(
                         cache[name], new.astype(cache[name].dtype), index, axis=1)
                     for name, new in (("key", key), ("value", value))}
        length, cache_length = query.shape[1], new_cache["key"].shape[1]
        # Cache slots are columns of the row: a slot is attended when it holds a token of the
        # row's text (segment 1), is not after the query, and (local layers) is in the window.
        allowed = attention_backends.allowed_keys(
            inputs["segment_ids"], inputs["cache_segments"], index + jnp.arange(length),
            jnp.arange(cache_length), spec)
        encoded = attention_backends.xla_attention(
            query, new_cache["key"].astype(query.dtype), new_cache["value"].astype(value.dtype),
            allowed)
        return jnp.einsum("btnh,nhd->btd", encoded, out_kernel), new_cache

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
