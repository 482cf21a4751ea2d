"""Place parameters, train state and batches on a mesh from logical axis names.

`Partitioner` is the one object the trainer, the embedder and the tests use: it owns the mesh
and the rules table, resolves each parameter's logical names to a NamedSharding (checking that
the mesh really divides the array), and provides the context under which the model's
activation constraints resolve.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from gemb.partitioning import rules as rules_lib

log = logging.getLogger(__name__)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise ValueError(f"Logical axis {name!r} has no rule in the rules table "
                     "(gemb/partitioning/rules.py); add one.")


def logical_to_partition_spec(names: Sequence[str | None], shape: Sequence[int],
                              mesh: jax.sharding.Mesh, rules, what: str) -> PartitionSpec:
    """PartitionSpec for one array, checking divisibility dimension by dimension."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}.")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a in mesh.shape and a not in used)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        shards = math.prod(mesh.shape[a] for a in axes)
        if axes and size % shards:
            if name in rules_lib.REPLICATE_IF_INDIVISIBLE:
                log.debug("%s: %s of size %d replicated (mesh axes %s have %d shards)",
                          what, name, size, axes, shards)
                axes = ()
            else:
                raise ValueError(
                    f"{what}: dimension {name!r} of size {size} cannot be split over mesh axes "
                    f"{axes} ({shards} shards) of mesh {dict(mesh.shape)}. Use a mesh whose "
                    f"{'/'.join(axes)} size divides {size}, or map {name!r} to another axis "
                    "in gemb/partitioning/rules.py.")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class Partitioner:
    """Mesh + logical rules -> shardings for parameters, batches and activations."""

    def __init__(self, mesh: jax.sharding.Mesh, rules=rules_lib.STANDARD_RULES):
        self.mesh = mesh
        self.rules = tuple(rules)

    @property
    def data_axes(self) -> tuple[str, ...]:
        return tuple(a for a in _mesh_axes_for("act_batch", self.rules) if a in self.mesh.shape)

    @property
    def data_parallel_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.data_axes)

    def param_shardings(self, boxed_params: Any) -> Any:
        """NamedShardings for a tree of nn.Partitioned (or abstract) parameters.

        Leaves without logical names (e.g. optimiser counters) are replicated.
        """
        def one(path, leaf):
            if isinstance(leaf, nn.Partitioned):
                spec = logical_to_partition_spec(leaf.names, leaf.value.shape, self.mesh,
                                                 self.rules, f"parameter {_path_name(path)}")
            else:
                spec = PartitionSpec()
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(
            one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Leading (batch) dimension over every data-like mesh axis, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(self.data_axes, *([None] * (ndim - 1))))

    def check_batch_size(self, batch_size: int, what: str = "global batch") -> None:
        if batch_size % self.data_parallel_size:
            raise ValueError(
                f"{what} of {batch_size} cannot be split over the data axes {self.data_axes} "
                f"({self.data_parallel_size} shards) of mesh {dict(self.mesh.shape)}; use a "
                f"multiple of {self.data_parallel_size}.")

    def shard_batch(self, batch: Any) -> Any:
        """Host numpy batch (the global batch, single host) -> sharded jax.Arrays."""
        def put(x):
            self.check_batch_size(x.shape[0])
            return jax.device_put(x, self.batch_sharding(x.ndim))

        return jax.tree_util.tree_map(put, batch)

    @contextlib.contextmanager
    def activation_context(self):
        """Inside it, the model's nn.with_logical_constraint calls resolve on this mesh."""
        with self.mesh, nn.logical_axis_rules(self.rules):
            yield
