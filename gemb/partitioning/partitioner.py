"""Place parameters, train state and batches on a mesh from logical axis names.

`Partitioner` is the one object the trainer, the embedder and the tests use: it owns the mesh
and the rules table, resolves each parameter's logical names to a NamedSharding (checking that
the mesh really divides the array), places host batches on the mesh, and provides the context
under which the model's activation constraints (`constrain`) resolve, through the same
resolver as the parameters (docs/design.md, convention 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
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
                              mesh: jax.sharding.Mesh, rules, what: str,
                              replicate_indivisible: frozenset[str] | bool = False
                              ) -> PartitionSpec:
    """PartitionSpec for one array, checking divisibility dimension by dimension.

    A dimension the mesh does not divide is an error naming `what`, unless its logical name is
    in `replicate_indivisible` (or that is True: every name), which replicates it instead.
    """
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}.")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a in mesh.shape and a not in used)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        shards = math.prod(mesh.shape[a] for a in axes)
        if axes and size % shards:
            if replicate_indivisible is True or (replicate_indivisible
                                                 and name in replicate_indivisible):
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


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """This process's part of the global batch: block `shard_index` of `num_shards` equal
    blocks, spread over `local_data_parallel_size` of its devices."""

    shard_index: int = 0
    num_shards: int = 1
    local_data_parallel_size: int = 1


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
                spec = logical_to_partition_spec(
                    leaf.names, leaf.value.shape, self.mesh, self.rules,
                    f"parameter {_path_name(path)}", rules_lib.REPLICATE_IF_INDIVISIBLE)
            else:
                spec = PartitionSpec()
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(
            one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def abstract_params(self, boxed_params: Any, dtype=None) -> Any:
        """Unboxed ShapeDtypeStructs carrying their shardings (restore / jit targets), in the
        params' own dtype or in `dtype`."""
        shardings = nn.unbox(self.param_shardings(boxed_params))
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype,
                                                        sharding=sharding),
            nn.unbox(boxed_params), shardings)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Leading (batch) dimension over every data-like mesh axis, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(self.data_axes, *([None] * (ndim - 1))))

    def check_batch_size(self, batch_size: int, what: str = "global batch") -> None:
        if batch_size % self.data_parallel_size:
            raise ValueError(
                f"{what} of {batch_size} cannot be split over the data axes {self.data_axes} "
                f"({self.data_parallel_size} shards) of mesh {dict(self.mesh.shape)}; use a "
                f"multiple of {self.data_parallel_size}.")

    def data_layout(self) -> "DataLayout":
        """Which block of every global batch this process feeds (t5x's get_data_layout).

        The batch's leading axis is split over the data axes; this process's devices hold one
        contiguous block of it, and processes that differ only along model axes (a tensor axis
        across hosts) hold the same block and must feed the same rows.
        """
        size = self.data_parallel_size
        index_map = self.batch_sharding(1).devices_indices_map((size,))
        mine = sorted({index_map[d][0].start or 0 for d in self.mesh.devices.flat
                       if d.process_index == jax.process_index()})
        per_process = len(mine)
        if mine != list(range(mine[0], mine[0] + per_process)) or mine[0] % per_process:
            raise ValueError(
                f"mesh {dict(self.mesh.shape)} gives process {jax.process_index()} the batch "
                f"shards {mine} of {size}, not one aligned contiguous block; build the mesh "
                "with create_mesh (hosts outermost on the data axes).")
        return DataLayout(shard_index=mine[0] // per_process, num_shards=size // per_process,
                          local_data_parallel_size=per_process)

    def place_batch(self, host_batch: Any) -> Any:
        """This process's rows of a batch (numpy) -> global jax.Arrays split over the data axes.

        Every leaf's leading axis is this process's block of the global batch (`data_layout`);
        with one process that is the whole batch. The global row count must divide over the
        data axes.
        """
        num_shards = self.data_layout().num_shards

        def put(path, x):
            x = np.asarray(x)
            what = f"batch feature {_path_name(path)!r}" if path else "global batch"
            if x.ndim == 0:
                raise ValueError(f"{what} is a scalar; every batch feature needs the batch as "
                                 "its leading axis.")
            global_shape = (x.shape[0] * num_shards, *x.shape[1:])
            self.check_batch_size(global_shape[0], what)
            return jax.make_array_from_process_local_data(self.batch_sharding(x.ndim), x,
                                                          global_shape)

        return jax.tree_util.tree_map_with_path(put, host_batch)

    def activation_spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]
                        ) -> PartitionSpec:
        """The sharding hint of an activation. A dimension the mesh does not divide is left
        replicated: a hint must never stop a run (the parameters are the checked part)."""
        return logical_to_partition_spec(logical_axes, shape, self.mesh, self.rules,
                                         f"activation {tuple(logical_axes)}",
                                         replicate_indivisible=True)

    @contextlib.contextmanager
    def activation_context(self):
        """Inside it (while tracing), `constrain` calls resolve on this partitioner."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Partitioner | None] = contextvars.ContextVar(
    "gemb_active_partitioner", default=None)


def active_partitioner() -> Partitioner | None:
    """The Partitioner of the enclosing `activation_context`, if any (kernels that XLA cannot
    partition use its mesh to run per shard)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for a large activation from its logical axis names; a no-op outside a
    `Partitioner.activation_context()` (single-device use, tests of a bare module)."""
    partitioner = _ACTIVE.get()
    if partitioner is None:
        return x
    spec = partitioner.activation_spec(logical_axes, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(partitioner.mesh, spec))
