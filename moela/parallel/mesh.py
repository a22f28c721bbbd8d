"""The device mesh from config: axes ``data`` × ``tensor`` × ``sequence`` (``mesh.*``, -1 = the rest).

Axes are ``AxisType.Auto`` (GSPMD propagation; explicit collectives only inside shard_map
islands). ``jax.make_mesh`` orders devices so the innermost axes (``sequence``, then
``tensor``) stay inside a host/slice and ``data`` spans hosts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from moela.configs.schema import MeshConfig

AXES = ("data", "tensor", "sequence")


class MeshError(ValueError):
    pass


def describe_devices(devices: Sequence[jax.Device]) -> str:
    """'8 cpu devices (ids 0-7, 1 process)': what a mesh error should show."""
    ids = sorted(d.id for d in devices)
    shown = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[0] + len(ids))) else ", ".join(map(str, ids[:16]))
    hosts = len({d.process_index for d in devices})
    return (
        f"{len(devices)} {devices[0].platform} devices (ids {shown}{' ...' if len(ids) > 16 else ''}, "
        f"{hosts} process{'es' if hosts > 1 else ''})"
    )


def mesh_shape(cfg: MeshConfig, num_devices: int, devices: Sequence[jax.Device] | None = None) -> tuple[int, ...]:
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
        present = describe_devices(devices) if devices else f"{num_devices} devices"
        raise MeshError(
            f"mesh ({requested}) needs {math.prod(sizes)} devices but {num_devices} are present: "
            f"{present}; make the sizes multiply to {num_devices} or set one of them to -1"
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over all (or the given) devices.

    On several TPU slices (devices with distinct ``slice_index``) the slow data-center
    network is crossed only by ``data``: the mesh is built with
    ``mesh_utils.create_hybrid_device_mesh``, ``data`` split into (slices x per-slice).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices), devices)
    auto = (AxisType.Auto,) * len(AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        from jax.experimental import mesh_utils

        if shape[0] % slices:
            raise MeshError(
                f"mesh data={shape[0]} must be a multiple of the {slices} slices: only the data axis crosses slices"
            )
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices)
        return Mesh(grid, AXES, axis_types=auto)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
