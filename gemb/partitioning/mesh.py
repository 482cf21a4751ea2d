"""Device meshes over (data, fsdp, tensor), built from ICI and DCN parallelism.

A parallelism dict gives each axis a size; -1 means "whatever is left". ICI is the fast
interconnect inside a slice / host group, DCN the network between slices; the global mesh axis
is the product of both (t5x / MaxText convention).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_parallelism(parallelism: Mapping[str, int] | Sequence[int], num_devices: int,
                        what: str) -> tuple[int, ...]:
    """Sizes for MESH_AXES with at most one -1 filled in; errors name the numbers."""
    if isinstance(parallelism, Mapping):
        unknown = set(parallelism) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"{what}: unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
        sizes = [int(parallelism.get(axis, 1)) for axis in MESH_AXES]
    else:
        sizes = [int(s) for s in parallelism]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"{what}: give {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"{what}: only one axis may be -1 (the rest), got {sizes}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {sizes}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{what}: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} "
                             f"devices: {num_devices} is not a multiple of {known}.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{what}: mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; make the product of the axis sizes equal "
            f"{num_devices}, or use -1 on one axis.")
    return tuple(sizes)


def create_mesh(ici_parallelism: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
                dcn_parallelism: Mapping[str, int] | Sequence[int] = (1, 1, 1),
                devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    num_slices = 1 + max(getattr(d, "slice_index", 0) for d in devices)
    dcn = resolve_parallelism(dcn_parallelism, num_slices, "dcn_parallelism")
    ici = resolve_parallelism(ici_parallelism, len(devices) // num_slices, "ici_parallelism")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # CPU and some GPU topologies have no physical layout to optimise for.
            grid = np.asarray(devices).reshape(ici)
    return jax.sharding.Mesh(grid, MESH_AXES)
