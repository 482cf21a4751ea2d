"""The one table that maps logical axis names to mesh axes (data, fsdp, tensor).

Parameters: vocab, embed, mlp, heads, kv_heads, head_dim, norm, layers, projection.
Activations: act_batch, act_length, act_embed, act_heads, act_mlp.

Each logical name maps to a mesh axis, a tuple of mesh axes, or None (replicated). A rule whose
mesh axis is absent from the mesh, or already used by another dimension of the same array, is
skipped, as in flax's logical partitioning.
"""

from __future__ import annotations

MeshAxes = str | tuple[str, ...] | None

STANDARD_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Parameters: FSDP shards the model dimension, tensor parallelism the wide dimensions.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    # Gemma 3 270M and 1B have ONE kv head: the partitioner replicates kv_heads whenever the
    # tensor axis does not divide them (every query-head shard then needs the whole kv head).
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("projection", "tensor"),
    # Activations: the batch is split over every data-like axis; the rest follows the params.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

# Parameter axes that fall back to replication (instead of an error) when the mesh axis does not
# divide them. Any other parameter dimension that does not divide is a configuration error worth
# reporting. Activations never fail: an indivisible activation dimension is left replicated
# (Partitioner.activation_spec), since it is only a hint to the compiler.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads", "heads"})
