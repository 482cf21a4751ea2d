"""The embedding model: tokens -> bidirectional Gemma 3 -> pooled -> projected -> normalised.

Call it with token rows and segment ids; it returns one embedding per (row, segment), so the
same module serves padded batches (one segment per row) and packed batches (several short
examples per row, kept apart by the attention mask and pooled separately).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.models import gemma3, heads, pooling
from gemb.models.config import EncoderConfig


class Encoder(nn.Module):
    config: EncoderConfig

    def setup(self):
        cfg = self.config
        self.transformer = gemma3.Transformer(cfg.transformer)
        self.head = heads.ProjectionHead(cfg.head_dims, cfg.transformer.dtype,
                                         cfg.transformer.param_dtype) if cfg.head_dims else None

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, num_segments: int = 1) -> dict[str, Any]:
        """Args:
          tokens: int [B, L].
          segment_ids: int [B, L], 0 on padding, 1..num_segments for the examples of a row.
            Defaults to one example filling each row.
          positions: int [B, L]; default: restart at 0 in every segment.
          num_segments: static number of example slots per row. 1 promises one example per
            row from column 0 on (then padding), the padded layout: a GPU then uses cuDNN.

        Returns a dict:
          pooled [B, S, D]: pooled final hidden states (before the head), float32;
          projected [B, S, E]: the head's output, unnormalised (heads.matryoshka_embedding
            gives the normalised embedding at a Matryoshka width);
          segment_mask [B, S]: which slots hold an example.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        hidden = self.transformer(tokens, segment_ids, positions, packed=num_segments > 1)
        pooled = pooling.POOLERS[self.config.pooling](hidden, segment_ids, num_segments)
        projected = self.head(pooled) if self.head is not None else pooled
        projected = projected.astype(jnp.float32)
        segment_mask = pooling.segment_membership(segment_ids, num_segments).sum(axis=1) > 0
        return {
            "pooled": pooled,
            "projected": projected,
            "segment_mask": segment_mask,
        }


def init_tokens() -> jax.Array:
    """A token row to trace the encoder with (its params do not depend on the row's shape)."""
    return jnp.zeros((1, 4), jnp.int32)


def boxed_params(config: EncoderConfig) -> Any:
    """The encoder's abstract params with their logical axis names (nn.Partitioned leaves of
    ShapeDtypeStructs; no memory): what Partitioner.abstract_params places on a mesh."""
    return jax.eval_shape(lambda: Encoder(config).init(jax.random.key(0), init_tokens()))["params"]
