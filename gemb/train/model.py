"""The model the trainer trains: the Encoder and the contrastive objective, behind one seam.

As t5x's BaseModel: the trainer holds an `EmbeddingModel` and calls its functions; it never
builds the encoder or looks inside a batch. The parameter tree is
{"encoder": {"transformer": ..., "head": ...}} plus "log_temperature" when the loss learns its
temperature.

The loss is split in two, `embed_fn` then `loss_from_embeddings`, because gradient caching
(gemb.losses.gradcache) needs the embeddings of the whole global batch between the two;
`loss_fn` is their composition, for a plain full-batch step or an evaluation.

A batch is a feature dict of gemb.data.feature_converter in one of its two layouts (see that
module and docs/design.md): padded (one example per row, every feature with the batch as its
leading axis) or packed (role blocks of rows holding several examples, with *_slot indices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.losses import ContrastiveLossConfig, initial_log_temperature, matryoshka_contrastive_loss
from gemb.models.config import EncoderConfig
from gemb.models.encoder import Encoder, boxed_params, init_tokens

PyTree = Any
Batch = Mapping[str, jax.Array]
Embeddings = dict[str, jax.Array]

# The roles of a batch and, in the packed layout, the slot feature of each.
_SLOT_OF_ROLE = {"query": "query_slot", "positive": "positive_slot", "negatives": "negative_slot"}


class EmbeddingModel:
    """Encoder + contrastive loss (see the module docstring).

    Args:
      encoder: the encoder's configuration.
      loss: the objective; with no matryoshka_dims of its own it trains the encoder's
        Matryoshka widths (EncoderConfig.matryoshka_dims).
    """

    def __init__(self, encoder: EncoderConfig, loss: ContrastiveLossConfig = ContrastiveLossConfig()):
        if not loss.matryoshka_dims:
            loss = dataclasses.replace(loss, matryoshka_dims=tuple(encoder.matryoshka_dims))
        self.encoder_config = encoder
        self.loss_config = loss
        self.module = Encoder(encoder)

    # -- parameters ------------------------------------------------------------------------

    def boxed_params(self) -> PyTree:
        """Abstract params with their logical axis names (nn.Partitioned leaves; no memory)."""
        params = {"encoder": boxed_params(self.encoder_config)}
        if self.loss_config.learnable_temperature:
            params["log_temperature"] = jax.ShapeDtypeStruct((), jnp.float32)
        return params

    def init_params(self, seed: int) -> PyTree:
        """Random params (unboxed); jit it with out_shardings to create them in place."""
        encoder = self.module.init(jax.random.key(seed), init_tokens())["params"]
        params = {"encoder": nn.unbox(encoder)}
        if self.loss_config.learnable_temperature:
            params["log_temperature"] = initial_log_temperature(self.loss_config)
        return params

    # -- the objective ---------------------------------------------------------------------

    def embed_fn(self, params: PyTree, batch: Batch, rng: jax.Array | None = None) -> Embeddings:
        """{'query' [B, E], 'positive' [B, E], and 'negatives' [B, K, E] when the batch has
        hard negatives}: the projected embeddings, unnormalised, float32."""
        del rng  # the encoder has no dropout
        if "query_slot" in batch:
            return self._embed_packed(params, batch)
        out = {"query": self._encode(params, batch, "query")[:, 0],
               "positive": self._encode(params, batch, "positive")[:, 0]}
        if "negatives_tokens" in batch:
            rows, k = batch["negatives_tokens"].shape[:2]
            out["negatives"] = self._encode(params, batch, "negatives")[:, 0].reshape(rows, k, -1)
        return out

    def _embed_packed(self, params: PyTree, batch: Batch) -> Embeddings:
        out = {}
        for role, slot in _SLOT_OF_ROLE.items():
            if f"{role}_tokens" not in batch:
                continue
            projected = self._encode(params, batch, role, batch[f"{role}_segment_mask"].shape[1])
            out[role] = projected.reshape(-1, projected.shape[-1])[batch[slot]]
        return out

    def _encode(self, params: PyTree, batch: Batch, role: str, num_segments: int = 1) -> jax.Array:
        """[R, S, E] for the role's token rows; padded negatives [B, K, L] go in as B * K rows."""
        tokens = batch[f"{role}_tokens"]
        length = tokens.shape[-1]
        output = self.module.apply(
            {"params": params["encoder"]}, tokens.reshape(-1, length),
            batch[f"{role}_segment_ids"].reshape(-1, length),
            batch[f"{role}_positions"].reshape(-1, length), num_segments=num_segments)
        return output["projected"]

    def loss_from_embeddings(self, params: PyTree, embeddings: Embeddings, batch: Batch
                             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of the batch's embeddings: NCE over the global batch at every
        Matryoshka width, the duplicate mask from the batch's token hashes."""
        return matryoshka_contrastive_loss(embeddings, batch, config=self.loss_config,
                                           log_temperature=params.get("log_temperature"))

    def loss_fn(self, params: PyTree, batch: Batch, rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of a batch (t5x's BaseModel.loss_fn)."""
        return self.loss_from_embeddings(params, self.embed_fn(params, batch, rng), batch)

