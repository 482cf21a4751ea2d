"""The contrastive training objective: NCE with global in-batch and hard negatives, duplicate
masking, Matryoshka prefixes and gradient caching (docs/recipe.md, "Loss")."""

from gemb.losses.contrastive import (
    ContrastiveLossConfig,
    contrastive_loss,
    contrastive_loss_from_features,
    effective_temperature,
    initial_log_temperature,
)
from gemb.losses.gradcache import (
    full_batch_value_and_grad,
    global_batch_size,
    gradient_cached_rows_value_and_grad,
    gradient_cached_value_and_grad,
    split_rows,
)
from gemb.losses.matryoshka import (
    embedding_prefix,
    matryoshka_contrastive_loss,
    matryoshka_dims_for,
)

__all__ = [
    "ContrastiveLossConfig",
    "contrastive_loss",
    "contrastive_loss_from_features",
    "effective_temperature",
    "embedding_prefix",
    "full_batch_value_and_grad",
    "global_batch_size",
    "gradient_cached_rows_value_and_grad",
    "gradient_cached_value_and_grad",
    "initial_log_temperature",
    "matryoshka_contrastive_loss",
    "matryoshka_dims_for",
    "split_rows",
]
