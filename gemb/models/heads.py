"""Projection head and Matryoshka prefixes.

The head is a stack of bias-free dense layers without activations between them: one layer
d_model -> 3072 is the Gemini Embedding head; (3072, 768) is EmbeddingGemma's pair. It is
randomly initialised (seeded) when a model is converted from a raw LLM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class ProjectionHead(nn.Module):
    dims: tuple[int, ...]
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.dims):
            kernel = self.param(
                f"dense_{i}",
                nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "projection")),
                (x.shape[-1], width), jnp.dtype(self.param_dtype))
            x = jnp.einsum("...d,de->...e", x.astype(self.dtype), kernel.astype(self.dtype))
        return x


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, in x's dtype (the one normalisation of gemb:
    the loss, `gemb embed` and the evaluators all use it). eps keeps an all-zero vector
    (padding) finite."""
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def matryoshka_embedding(projected: jax.Array, dim: int) -> jax.Array:
    """The served embedding at Matryoshka width `dim`: the first `dim` coordinates of the head's
    output, re-normalised on their own (a prefix of a unit vector is not a unit vector)."""
    return l2_normalize(projected[..., :dim].astype(jnp.float32))
