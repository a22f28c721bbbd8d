"""The device mesh from config: -1 fills, and sizes that cannot cover the devices are refused."""

from __future__ import annotations

import jax
import pytest

from moela.configs.schema import MeshConfig
from moela.parallel.mesh import AXES, MeshError, build_mesh, mesh_shape


@pytest.mark.parametrize(
    "cfg, devices, shape",
    [
        (MeshConfig(), 8, (8, 1, 1)),
        (MeshConfig(data=-1, tensor=2, sequence=2), 8, (2, 2, 2)),
        (MeshConfig(data=1, tensor=-1, sequence=4), 8, (1, 2, 4)),
        (MeshConfig(data=4, tensor=2, sequence=1), 8, (4, 2, 1)),
    ],
)
def test_sizes_fill_and_multiply_to_the_devices(cfg, devices, shape):
    assert mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (MeshConfig(data=3, tensor=1, sequence=1), "needs 3 devices but 8 are present"),
        (MeshConfig(data=-1, tensor=3, sequence=1), "8 devices are not divisible by 3"),
        (MeshConfig(data=-1, tensor=-1, sequence=1), "at most one -1"),
        (MeshConfig(data=0, tensor=1, sequence=1), "sizes must be positive"),
    ],
)
def test_impossible_meshes_are_refused(cfg, needle):
    with pytest.raises(MeshError, match=needle):
        mesh_shape(cfg, 8)


def test_build_mesh_uses_every_device_with_auto_axes():
    mesh = build_mesh(MeshConfig(data=-1, tensor=2, sequence=2))
    assert mesh.axis_names == AXES and mesh.devices.size == jax.device_count() == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
