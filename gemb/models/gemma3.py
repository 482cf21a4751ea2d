"""The Gemma 3 transformer: bidirectional by default (the encoder), causal as an option.

Layer layout. With scan_layers, the layers are grouped in periods of the attention pattern
(5 local + 1 global for Gemma 3) and nn.scan runs over the periods; the parameters of period
slot k live under "scanned_layers/layer_{k}" with a leading "layers" axis of length
num_layers // 6. Layers left over after the last whole period (e.g. 2 of the 1B's 26) are
unscanned and keep upstream names "layer_{i}" with their global index i. With scan_layers off,
every layer is "layer_{i}" exactly as in upstream Gemma. gemb/checkpoints/layout.py converts
between the two.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import linen as nn

from gemb.models import attention, layers
from gemb.models.config import AttentionType, TransformerConfig
from gemb.partitioning.partitioner import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


class Block(nn.Module):
    """Pre-norm attention and MLP, each followed by its post-norm before the residual add."""

    config: TransformerConfig
    attention_type: AttentionType

    @nn.compact
    def __call__(self, x, positions, attention_inputs, cache=None):
        """With a cache (decoding): returns (x, new cache) instead of x."""
        cfg = self.config
        norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)  # noqa
        attended = attention.Attention(cfg, self.attention_type, name="attn")(
            norm("pre_attention_norm")(x), positions, attention_inputs, cache)
        if cache is not None:
            attended, cache = attended
        attended = checkpoint_name(attended, "attn_out")
        x = x + norm("post_attention_norm")(attended)
        mlp_out = layers.FeedForward(cfg.embed_dim, cfg.hidden_dim, cfg.dtype, cfg.param_dtype,
                                     name="mlp")(norm("pre_ffw_norm")(x))
        x = x + norm("post_ffw_norm")(mlp_out)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return x if cache is None else (x, cache)


def _maybe_remat(block_cls, config: TransformerConfig):
    if config.remat_policy == "none":
        return block_cls
    if config.remat_policy not in _REMAT_POLICIES:
        raise ValueError(f"remat_policy={config.remat_policy!r}; choose 'none' or one of "
                         f"{sorted(_REMAT_POLICIES)}.")
    # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
    return nn.remat(block_cls, policy=_REMAT_POLICIES[config.remat_policy],
                    prevent_cse=not config.scan_layers)


class Period(nn.Module):
    """One period of the attention pattern: the unit nn.scan iterates over."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, attention_inputs, caches=None):
        """caches: None, or one cache per slot (decoding); the new caches are the scan's
        per-period outputs."""
        block_cls = _maybe_remat(Block, self.config)
        new_caches = None if caches is None else []
        for slot, attention_type in enumerate(self.config.attention_pattern):
            block = block_cls(self.config, attention_type, name=f"layer_{slot}")
            if caches is None:
                x = block(x, positions, attention_inputs)
            else:
                x, cache = block(x, positions, attention_inputs, caches[slot])
                new_caches.append(cache)
        return x, new_caches


class Transformer(nn.Module):
    """tokens [B, L] -> final-normed hidden states [B, L, D] (and tied-embedding logits)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embedder = layers.Embedder(cfg.vocab_size, cfg.embed_dim, cfg.dtype, cfg.param_dtype)
        if cfg.num_scanned_periods:
            scanned = nn.scan(
                Period,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),  # caches: one per period
                length=cfg.num_scanned_periods,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.scanned_layers = scanned(cfg)
        types = cfg.layer_attention_types()
        first_unscanned = cfg.num_scanned_periods * len(cfg.attention_pattern)
        block_cls = _maybe_remat(Block, cfg)
        self.unscanned_layers = [
            block_cls(cfg, types[i], name=f"layer_{i}") for i in range(first_unscanned, cfg.num_layers)
        ]
        self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, cfg.param_dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_logits: bool = False,
                 packed: bool = True, cache: dict | None = None):
        """Args:
          tokens: int [B, L].
          segment_ids: int [B, L]; 0 marks padding, 1, 2, ... the examples packed in a row.
            Defaults to one segment over every position (no padding).
          positions: int [B, L]; defaults to positions restarting at 0 in every segment.
          return_logits: also return [B, L, vocab] logits from the tied embedding.
          packed: rows may hold several examples (static). False promises one example per row
            starting at column 0 (the padded layout), which lets a GPU use cuDNN's kernel.
          cache: decoding (causal mode): the `init_cache` state; `tokens` are the next columns
            of every row, written at cache["index"] (the prompt in the prefill, then one token
            per step). segment_ids then mark real tokens (1) and padding (0), and positions
            should be given (the default restarts them at the first new column). The result
            gains the new cache as its last element.
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length]; got shape {tokens.shape}.")
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        if positions is None:
            positions = attention.positions_from_segments(segment_ids)
        if cache is None:
            attention_inputs = attention.attention_inputs(cfg, segment_ids, packed)
        else:
            if cfg.attention_mode != "causal":
                raise ValueError("a KV cache decodes a causal model; use "
                                 "config.replace(attention_mode='causal').")
            cache_segments = jax.lax.dynamic_update_slice_in_dim(
                cache["segments"], segment_ids.astype(jnp.int32), cache["index"], axis=1)
            attention_inputs = {"segment_ids": segment_ids, "cache_index": cache["index"],
                                "cache_segments": cache_segments}

        x = self.embedder.encode(tokens)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        new_layers = {}
        if cfg.num_scanned_periods:
            x, new_layers["scanned"] = self.scanned_layers(
                x, positions, attention_inputs, None if cache is None else cache["scanned"])
        unscanned = []
        for number, block in enumerate(self.unscanned_layers):
            if cache is None:
                x = block(x, positions, attention_inputs)
            else:
                x, layer_cache = block(x, positions, attention_inputs, cache["unscanned"][number])
                unscanned.append(layer_cache)
        hidden = self.final_norm(x)
        out = (hidden, self.embedder.decode(hidden)) if return_logits else (hidden,)
        if cache is not None:
            new_cache = {"index": cache["index"] + tokens.shape[1], "segments": cache_segments,
                         "scanned": new_layers.get("scanned"), "unscanned": unscanned}
            out = out + (new_cache,)
        return out if len(out) > 1 else out[0]


def init_cache(config: TransformerConfig, batch: int, max_length: int,
               dtype: str | None = None) -> dict:
    """An empty KV cache for `Transformer(config)(..., cache=...)`: keys and values of every
    layer [B, max_length, K, H] (scanned layers stacked per period slot), the segments of the
    slots written so far (0 = empty or padding) and the next slot to write."""
    shape = (batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)

    def layer(leading=()):
        return {"key": jnp.zeros(leading + shape, dtype),
                "value": jnp.zeros(leading + shape, dtype)}

    periods = config.num_scanned_periods
    return {
        "index": jnp.zeros((), jnp.int32),
        "segments": jnp.zeros((batch, max_length), jnp.int32),
        "scanned": [layer((periods,)) for _ in config.attention_pattern] if periods else None,
        "unscanned": [layer() for _ in range(config.num_remainder_layers)],
    }
