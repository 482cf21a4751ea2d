"""The model the trainer trains: the Encoder and the contrastive objective, behind one seam.

As t5x's BaseModel: the trainer holds an `EmbeddingModel` and calls its functions; it never
builds the encoder or looks inside a batch. The parameter tree is
{"encoder": {"transformer": ..., "head": ...}} plus "log_temperature" when the loss learns its
temperature.

The loss is split in two, `embed_fn` then `loss_from_embeddings`, because gradient caching
(gemb.losses.gradcache) needs the embeddings of the whole global batch between the two;
`loss_fn` is their composition, for a plain full-batch step or an evaluation. `embed_fn` is
itself `encoder_rows` -> `encode_rows` (each role's rows through the Encoder, [R, S, E]) ->
`embeddings_from_rows` (each example's (row, segment)): the gradient cache chunks the encoder
rows, which is exact in both layouts, and the microbatched step splits a batch with
`split_microbatches`.

A batch is a feature dict of gemb.data.feature_converter in one of its two layouts (see that
module and docs/design.md): padded (one example per row, every feature with the batch as its
leading axis) or packed (role blocks of rows holding several examples, with *_slot indices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gemb.data import feature_converter
from gemb.losses import (ContrastiveLossConfig, initial_log_temperature,
                         matryoshka_contrastive_loss, split_rows)
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
        rows = self.encoder_rows(batch)
        return self.embeddings_from_rows(self.encode_rows(params, rows, rng), batch)

    @staticmethod
    def num_examples(batch: Batch) -> int:
        """B, the examples of a batch (in either layout)."""
        return batch["query_hash"].shape[0]

    @staticmethod
    def encoder_rows(batch: Batch) -> dict[str, dict[str, jax.Array]]:
        """What the Encoder reads, per role: {role: {tokens, segment_ids, positions [R, L]}}
        (packed: and segment_mask [R, S], whose shape gives the static segments per row).

        Padded negatives [B, K, L] are B * K rows (a reshape, no copy). Each role's rows are
        encoded independently of each other, so any split of them (gradient-cache chunks) is
        exact.
        """
        rows = {}
        for role in _SLOT_OF_ROLE:
            if f"{role}_tokens" not in batch:
                continue
            length = batch[f"{role}_tokens"].shape[-1]
            role_rows = {name: batch[f"{role}_{name}"].reshape(-1, length)
                         for name in ("tokens", "segment_ids", "positions")}
            if f"{role}_segment_mask" in batch:
                role_rows["segment_mask"] = batch[f"{role}_segment_mask"]
            rows[role] = role_rows
        return rows

    def encode_rows(self, params: PyTree, rows: Mapping[str, Mapping[str, jax.Array]],
                    rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """{role: [R, S, E]}: the projected output of every (row, segment), float32."""
        del rng  # the encoder has no dropout
        out = {}
        for role, role_rows in rows.items():
            num_segments = role_rows["segment_mask"].shape[1] if "segment_mask" in role_rows else 1
            output = self.module.apply(
                {"params": params["encoder"]}, role_rows["tokens"], role_rows["segment_ids"],
                role_rows["positions"], num_segments=num_segments)
            out[role] = output["projected"]
        return out

    @staticmethod
    def embeddings_from_rows(row_outputs: Mapping[str, jax.Array], batch: Batch) -> Embeddings:
        """Each example's embedding read from the row outputs of `encode_rows`: padded,
        segment 0 of its row; packed, its slot (a gather: its gradient adds onto the rows)."""
        out = {}
        packed = "query_slot" in batch
        for role, slot in _SLOT_OF_ROLE.items():
            if role not in row_outputs:
                continue
            projected = row_outputs[role]
            if packed:
                out[role] = projected.reshape(-1, projected.shape[-1])[batch[slot]]
            elif role == "negatives":
                examples, k = batch["negatives_tokens"].shape[:2]
                out[role] = projected[:, 0].reshape(examples, k, -1)
            else:
                out[role] = projected[:, 0]
        return out

    @staticmethod
    def split_microbatches(batch: Batch, microbatches: int) -> Batch:
        """The batch as [microbatches, ...] stacks; microbatch m holds examples m, m + n, ...
        of the global batch (`split_rows`), each its own contrastive problem.

        Packed, split_rows hands microbatch m the rows m, m + n, ... of every role, and a
        converter with pack_groups = n put exactly microbatch m's examples there
        (`check_microbatches` verifies it on the host). A slot counts rows of the whole batch,
        so it is renumbered into the microbatch's rows: global row q is row q // n of
        microbatch q % n.
        """
        micro = dict(split_rows(dict(batch), microbatches, "microbatches"))
        if "query_slot" in batch:
            for role, slot in _SLOT_OF_ROLE.items():
                if slot not in micro:
                    continue
                segments = batch[f"{role}_segment_mask"].shape[1]
                row, segment = jnp.divmod(micro[slot], segments)
                micro[slot] = (row // microbatches) * segments + segment
        return micro

    @staticmethod
    def check_microbatches(host_batch: Mapping[str, np.ndarray], microbatches: int) -> None:
        """On the host, before placing: a packed batch's examples sit in their microbatch's
        rows (see `split_microbatches`); a clear error otherwise, not a silently wrong loss."""
        feature_converter.check_pack_groups(host_batch, microbatches)

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

