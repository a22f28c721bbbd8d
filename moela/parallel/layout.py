"""The active sharding layout: a mesh plus the rules of one strategy.

Model code never names a mesh axis. It names logical axes (``constrain(x, ("batch",
"length", "act_embed"))``) and asks ``layout.axis("expert")`` which mesh axis, if any, a
logical name is split over; the answer comes from the layout made current with ``use``.
Without a current layout (one device, tests of single layers) every helper is a no-op, so
the same model code runs unsharded.

The trainer and the generator enter ``use(layout)`` *inside* the functions they jit, so the
layout is part of what is traced, not ambient state a stale compilation could miss.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moela.parallel.rules import Rules, ShardingRuleError, check_divisible, check_rules, logical_to_spec, strategy


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: Rules
    name: str = "custom"

    @classmethod
    def of(cls, mesh: Mesh, strategy_name: str) -> "Layout":
        rules = strategy(strategy_name)
        check_rules(rules, dict(mesh.shape), f"strategy '{strategy_name}'")
        return cls(mesh, rules, strategy_name)

    def spec(self, names) -> PartitionSpec:
        return logical_to_spec(names, self.rules)

    def sharding(self, names) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    def axis(self, name: str) -> str | None:
        """The mesh axis logical ``name`` is split over, or None when it is not split (size 1)."""
        target = dict(self.rules).get(name)
        return target if target is not None and self.mesh.shape[target] > 1 else None

    def size(self, name: str) -> int:
        axis = self.axis(name)
        return self.mesh.shape[axis] if axis else 1


_CURRENT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("moela_layout", default=None)


@contextlib.contextmanager
def use(layout: Layout | None):
    token = _CURRENT.set(layout)
    try:
        yield layout
    finally:
        _CURRENT.reset(token)


def current() -> Layout | None:
    return _CURRENT.get()


def constrain(x, names):
    """``with_sharding_constraint`` by logical names under the current layout; identity without one."""
    layout = current()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(names))


def variable_names(var) -> tuple:
    names = var.get_metadata().get("out_sharding")
    if names is None:
        raise ShardingRuleError(f"a model variable of shape {var.shape} has no logical axis names")
    return tuple(names)


def state_shardings(state: nnx.State, layout: Layout) -> nnx.State:
    """A NamedSharding for every variable of an (abstract) nnx state, checked for divisibility."""
    mesh_shape = dict(layout.mesh.shape)

    def one(path, var):
        spec = layout.spec(variable_names(var))
        check_divisible(var.shape, spec, mesh_shape, "parameter " + "/".join(map(str, path)))
        return NamedSharding(layout.mesh, spec)

    return nnx.map_state(one, state)


def bytes_per_device(shape, dtype, spec: PartitionSpec, mesh_shape) -> int:
    shards = math.prod(mesh_shape[a] for a in spec if a is not None)
    return math.prod(shape) * jax.numpy.dtype(dtype).itemsize // shards


def sharding_report(state: nnx.State, layout: Layout) -> list[dict]:
    """Per variable: path, shape, logical names, PartitionSpec and bytes per device (raises where
    a mesh axis does not divide a dim)."""
    mesh_shape = dict(layout.mesh.shape)
    rows = []
    for path, var in nnx.to_flat_state(state):
        names = variable_names(var)
        spec = layout.spec(names)
        check_divisible(var.shape, spec, mesh_shape, "parameter " + "/".join(map(str, path)))
        rows.append({"path": "/".join(map(str, path)), "shape": tuple(var.shape), "names": names,
                     "spec": tuple(spec) + (None,) * (len(var.shape) - len(spec)),
                     "bytes_per_device": bytes_per_device(var.shape, var.dtype, spec, mesh_shape)})
    return rows


def state_bytes(state: nnx.State, layout: Layout) -> int:
    """Bytes one device holds of a (possibly abstract) nnx state under the layout."""
    return sum(r["bytes_per_device"] for r in sharding_report(state, layout))


def format_report(rows: list[dict]) -> str:
    lines = [f"{'parameter':<44}{'shape':<22}{'sharding':<34}{'MiB/device':>11}"]
    for r in rows:
        spec = "[" + ", ".join("·" if a is None else a for a in r["spec"]) + "]"
        lines.append(f"{r['path']:<44}{str(r['shape']):<22}{spec:<34}{r['bytes_per_device'] / 2**20:>11.3f}")
    lines.append(f"{'total':<100}{sum(r['bytes_per_device'] for r in rows) / 2**20:>11.3f}")
    return "\n".join(lines)
