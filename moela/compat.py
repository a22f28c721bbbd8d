"""What differs between the JAX releases moela runs on (0.10.2 up to 0.12), in one place.

moela is written in the current spelling of every API that all supported releases share
(``jax.shard_map``, ``jax.set_mesh``, ``jax.export``, explicit ``NamedSharding``s). What remains
is here, so the rest of the package never tests a version:

- **Lowering for a GPU that is not present.** jax 0.12's Pallas Triton lowering asks the current
  device which GPU it is compiling for; on a CPU-only machine there is none and it raises ("No
  supported GPU devices found"). :func:`export` names an abstract GPU (an H100 by default) through
  an abstract mesh, the mechanism jax provides for ahead-of-time lowering; jax 0.10 never asks.
- **The Pallas Triton backend is deprecated from jax 0.11** (Mosaic GPU is its successor). It is
  still the backend moela's GPU kernels lower through, on every supported release, so
  :func:`export` silences exactly that one deprecation while it lowers them (nothing else), and
  ``docs/design.md`` records the port to Mosaic GPU as open work.

- **Reading a scan out of a jaxpr.** jax 0.10 records a scan's carry count as the parameter
  ``num_carry``; jax 0.12 records the structure of its outputs (``ft_out``) instead.
  :func:`scan_num_carry` reads either (the memory planner counts a scan's stacked outputs).

This module imports nothing of moela and sits below every layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax

# the custom call that the Pallas Triton backend emits; jax.export refuses it unless told it is meant
TRITON_CALL = "__gpu$xla.gpu.triton"
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
GPU_PLATFORMS = ("cuda", "rocm")
# the device jax's GPU-info registry knows by this name (jax._src.gpu_info.GpuVersion)
DEFAULT_GPU = "NVIDIA H100"


@contextlib.contextmanager
def lowering_for(platform: str, gpu: str = DEFAULT_GPU) -> Iterator[None]:
    """Within this block, tracing and lowering target ``platform`` even where this machine has no
    such device: for a GPU platform, an abstract ``gpu`` device stands in for the missing one, and
    the Triton deprecation warning of the lowering is silenced (see the module docstring)."""
    if platform not in GPU_PLATFORMS:
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=gpu, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_lowering",), abstract_device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
        with jax.sharding.use_abstract_mesh(mesh):
            yield


def export(fn: Callable, platform: str, *args, gpu: str = DEFAULT_GPU, **kwargs) -> jax.export.Exported:
    """``jax.export`` of ``jax.jit(fn)`` for ``platform`` ("tpu", "cuda", "rocm" or "cpu") on
    abstract arguments (``jax.ShapeDtypeStruct``s or arrays), on a machine without that hardware.
    Triton kernel calls are allowed into the exported module (jax refuses unknown custom calls
    by default)."""
    disabled: Sequence = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform in GPU_PLATFORMS else []
    with lowering_for(platform, gpu):
        return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args, **kwargs)


def scan_num_carry(eqn) -> int:
    """How many of a ``scan`` equation's outputs are its final carry (the rest are stacked ys)."""
    if "num_carry" in eqn.params:
        return eqn.params["num_carry"]
    carry, _ = eqn.params["ft_out"].update(list(eqn.outvars)).unpack()
    return len(carry)
