"""The device mesh from config: axes ``data`` × ``tensor`` × ``sequence`` (``mesh.*``, -1 = the rest).

Axes are ``AxisType.Auto`` (GSPMD propagation; explicit collectives only inside shard_map
islands). ``jax.make_mesh`` orders devices so the innermost axes (``sequence``, then
``tensor``) stay inside a host/slice and ``data`` spans hosts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from configs.schema import MeshConfig

AXES = ("data", "tensor", "sequence")


class MeshError(ValueError):
    pass


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Sizes for ``AXES`` with one -1 filled in; raises when they cannot cover ``num_devices``."""
    sizes = [cfg.data, cfg.tensor, cfg.sequence]
    requested = "data={}, tensor={}, sequence={}".format(*sizes)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh ({requested}): sizes must be positive, with at most one -1 (= the rest)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh ({requested}): {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh ({requested}) needs {math.prod(sizes)} devices but {num_devices} are present "
                        f"({jax.devices()[0].platform} x{num_devices}); make the sizes multiply to {num_devices} "
                        "or set one of them to -1")
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a [B, T] batch split over ``data``."""
    return NamedSharding(mesh, PartitionSpec("data"))
