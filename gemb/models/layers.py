"""Building blocks of Gemma 3 with upstream parameter names and logical axis names.

Parameter names and layouts follow google-deepmind/gemma (zero-centred RMSNorm scales, an
unscaled embedding table, q / kv / attn_vec einsum kernels, a stacked gating kernel), so
importing any Gemma checkpoint is a rename. Every parameter carries logical axis names; the map
from logical names to mesh axes lives in gemb/partitioning/rules.py only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemb.partitioning.partitioner import constrain

# Initialisers matter only for the parts trained from scratch (the projection head) and for
# random-weight tests and benchmarks; imported weights replace them.
_embedding_init = nn.initializers.normal(stddev=1.0)
_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                                out_axis=-1)


class RMSNorm(nn.Module):
    """RMSNorm with a zero-centred scale: y = x / rms(x) * (1 + scale), computed in float32."""

    eps: float = 1e-6
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (x.shape[-1],), jnp.dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
    """Token embedding table, shared with the output logits (tied, as in Gemma)."""

    vocab_size: int
    embed_dim: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self):
        self.input_embedding = self.param(
            "input_embedding",
            nn.with_logical_partitioning(_embedding_init, ("vocab", "embed")),
            (self.vocab_size, self.embed_dim), jnp.dtype(self.param_dtype),
        )

    def encode(self, tokens: jax.Array) -> jax.Array:
        table = self.input_embedding.astype(self.dtype)
        x = jnp.take(table, tokens, axis=0)
        # Gemma multiplies by sqrt(d) in the compute dtype, after the lookup.
        return x * jnp.sqrt(jnp.asarray(self.embed_dim, jnp.float32)).astype(x.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,vd->btv", x, self.input_embedding.astype(x.dtype))


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale_factor: float) -> jax.Array:
    """Rotary embedding on the two halves of the head dimension (Gemma / NeoX layout).

    x: [batch, length, heads, head_dim]; positions: [batch, length].
    """
    head_dim = x.shape[-1]
    fraction = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    inv_frequency = 1.0 / (base**fraction)
    angles = (positions.astype(jnp.float32)[..., None] / scale_factor) * inv_frequency
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class FeedForward(nn.Module):
    """Gated GELU MLP: linear(gelu(x W_gate) * (x W_up))."""

    embed_dim: int
    hidden_dim: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gating = self.param(
            "gating_einsum",
            nn.with_logical_partitioning(_kernel_init, (None, "mlp", "embed")),
            (2, self.hidden_dim, self.embed_dim), jnp.dtype(self.param_dtype),
        ).astype(self.dtype)
        linear = self.param(
            "linear", nn.with_logical_partitioning(_kernel_init, ("mlp", "embed")),
            (self.hidden_dim, self.embed_dim), jnp.dtype(self.param_dtype),
        ).astype(self.dtype)
        gate = jnp.einsum("btd,fd->btf", x, gating[0])
        up = jnp.einsum("btd,fd->btf", x, gating[1])
        hidden = jax.nn.gelu(gate, approximate=True) * up
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", hidden, linear)
