"""One way to choose between implementations of an op: a registry of backends by name.

Every op moela computes in more than one way (attention, paged attention, the grouped matmul of
the experts, the expert-parallel dispatch) keeps its implementations in a :class:`Backends`:
name -> implementation, plus the name ``auto`` stands for on each platform. The ``runtime``
config section names a backend per op (``runtime.attention = "xla"``, ...); every caller
resolves it here, so a name means the same everywhere and a wrong one gets the same error:

    >>> GROUPED.resolve("nope")
    BackendError: unknown grouped matmul backend 'nope'; valid: auto, ragged_dot, blocked

Resolution happens when the op is traced, on the platform of the default JAX backend: ``auto``
is the Pallas kernel on TPU and GPU and the XLA formulation on CPU, op by op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Generic, TypeVar

import jax

T = TypeVar("T")

ANY = "*"  # the ``auto`` entry for platforms without their own


class BackendError(ValueError):
    """An unknown backend name, or one this platform cannot run."""


def platform() -> str:
    """The default JAX platform as the registries name it: ``cpu``, ``tpu`` or ``gpu``."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


@dataclasses.dataclass(frozen=True)
class Backends(Generic[T]):
    """The implementations of one op by name, and what ``auto`` means per platform."""

    op: str
    impls: Mapping[str, T]
    auto: Mapping[str, str]

    def __post_init__(self):
        if ANY not in self.auto:
            raise ValueError(f"{self.op}: the auto table needs a {ANY!r} entry")
        unknown = set(self.auto.values()) - set(self.impls)
        if unknown:
            raise ValueError(f"{self.op}: auto names unregistered backends {sorted(unknown)}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a config may give: ``auto`` first, then the backends."""
        return ("auto", *self.impls)

    def resolve(self, name: str, on: str | None = None) -> str:
        """The backend ``name`` stands for on platform ``on`` (default: this process's)."""
        if name == "auto":
            table = self.auto
            return table.get(on or platform(), table[ANY])
        if name not in self.impls:
            raise BackendError(f"unknown {self.op} backend {name!r}; valid: {', '.join(self.names)}")
        return name

    def __getitem__(self, name: str) -> T:
        """The implementation ``name`` (``auto`` included) resolves to."""
        return self.impls[self.resolve(name)]
