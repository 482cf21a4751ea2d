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
          num_segments: static number of example slots per row.

        Returns a dict:
          pooled [B, S, D]: pooled final hidden states (before the head), float32;
          projected [B, S, E]: the head's output, unnormalised;
          embeddings {dim: [B, S, dim]}: L2-normalised Matryoshka prefixes;
          segment_mask [B, S]: which slots hold an example.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        hidden = self.transformer(tokens, segment_ids, positions)
        pooled = pooling.POOLERS[self.config.pooling](hidden, segment_ids, num_segments)
        projected = self.head(pooled) if self.head is not None else pooled
        projected = projected.astype(jnp.float32)
        segment_mask = pooling.segment_membership(segment_ids, num_segments).sum(axis=1) > 0
        return {
            "pooled": pooled,
            "projected": projected,
            "embeddings": heads.matryoshka_embeddings(projected, self.config.matryoshka_dims),
            "segment_mask": segment_mask,
        }
