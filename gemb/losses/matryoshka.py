"""Matryoshka representation learning: the contrastive loss on nested embedding prefixes.

The total is sum_d w_d * L(prefix_d), where L is the contrastive loss of
`gemb.losses.contrastive` and prefix_d keeps the first d coordinates of every embedding.
Each prefix is re-normalised (the contrastive loss L2-normalises its inputs), because a
prefix of a unit vector is not a unit vector and the model is served at each prefix size with
cosine similarity.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from gemb.losses.contrastive import (
    ContrastiveLossConfig,
    contrastive_loss_from_features,
)

# Embedding arrays whose last axis is the embedding dimension.
EMBEDDING_KEYS = ("query", "positive", "negatives")


def matryoshka_dims_for(config: ContrastiveLossConfig, embedding_dim: int) -> tuple[int, ...]:
    """The prefix sizes the loss runs at; checks them against the model's embedding size."""
    dims = config.matryoshka_dims or (embedding_dim,)
    if dims[-1] > embedding_dim:
        raise ValueError(
            f"ContrastiveLossConfig.matryoshka_dims={dims} asks for a prefix of {dims[-1]} but "
            f"the embeddings have only {embedding_dim} dimensions; drop the larger dims or "
            "widen the projection head."
        )
    return dims


def matryoshka_weights_for(config: ContrastiveLossConfig, num_dims: int) -> tuple[float, ...]:
    return config.matryoshka_weights or (1.0,) * num_dims


def embedding_prefix(embeddings: Mapping[str, jax.Array], dim: int) -> dict[str, jax.Array]:
    """The first `dim` coordinates of every embedding array (normalised later, by the loss)."""
    return {
        key: value[..., :dim] if key in EMBEDDING_KEYS else value
        for key, value in embeddings.items()
    }


def matryoshka_contrastive_loss(
    embeddings: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    log_temperature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss: weighted contrastive losses over the Matryoshka prefixes.

    Args:
      embeddings: 'query' [B, E], 'positive' [B, E], optional 'negatives' [B, K, E].
      batch: the features the duplicate mask and hard negatives need (see
        `contrastive_loss_from_features`); other keys are ignored.
      config: loss options; config.matryoshka_dims empty means the full embedding only.
      log_temperature: the learnt log(tau) when config.learnable_temperature.

    Returns:
      (loss, metrics). metrics hold 'loss' (the weighted total), and for every prefix size d
      'loss/dim_d', 'accuracy/dim_d', 'positive_similarity/dim_d',
      'hardest_negative_similarity/dim_d'; the unsuffixed accuracy and similarities are those
      of the largest prefix, and 'temperature' is the effective tau.
    """
    if "query" not in embeddings:
        raise ValueError("embeddings lack 'query'; the embed function must return a dict with "
                         "'query', 'positive' and optionally 'negatives'.")
    dims = matryoshka_dims_for(config, embeddings["query"].shape[-1])
    weights = matryoshka_weights_for(config, len(dims))
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for dim, weight in zip(dims, weights):
        loss, dim_metrics = contrastive_loss_from_features(
            embedding_prefix(embeddings, dim), batch, config=config, log_temperature=log_temperature
        )
        total = total + weight * loss
        metrics[f"loss/dim_{dim}"] = loss.astype(jnp.float32)
        for name in ("accuracy", "positive_similarity", "hardest_negative_similarity"):
            metrics[f"{name}/dim_{dim}"] = dim_metrics[name]
    for name in ("accuracy", "positive_similarity", "hardest_negative_similarity"):
        metrics[name] = metrics[f"{name}/dim_{dims[-1]}"]
    metrics["temperature"] = dim_metrics["temperature"]
    total = total.astype(loss.dtype)
    metrics["loss"] = total.astype(jnp.float32)
    return total, metrics
