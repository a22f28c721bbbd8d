"""A sharding layout: a mesh plus the rules of one strategy, and the partitioner the model runs
under on that mesh.

Model code never names a mesh axis. It names logical axes (``rt.constrain(x, ("batch",
"length", "act_embed"))``) and asks its ``Partitioner`` (``moela.model.runtime``) for the few
things that need the mesh; :class:`Layout` is the partitioner of a mesh: it maps logical names
to mesh axes by its rules (``layout.axis("expert")``), places variables, and runs the
``shard_map`` islands (``moela.parallel.ring``, ``moela.parallel.experts``). It is passed
explicitly, in the ``Runtime`` of every jitted step, never held as ambient state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moela.kernels import paged
from moela.model.runtime import Partitioner
from moela.parallel import experts, ring
from moela.parallel.rules import Rules, ShardingRuleError, check_divisible, check_rules, logical_to_spec, strategy


@dataclasses.dataclass(frozen=True)
class Layout(Partitioner):
    mesh: Mesh
    rules: Rules
    name: str = "custom"

    @classmethod
    def of(cls, mesh: Mesh, strategy_name: str) -> Layout:
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

    # -- the Partitioner hooks --------------------------------------------------------------
    def size(self, name: str) -> int:
        axis = self.axis(name)
        return self.mesh.shape[axis] if axis else 1

    def constrain(self, x, names):
        return jax.lax.with_sharding_constraint(x, self.sharding(names))

    def sequence_order(self, length: int):
        n = self.size("length")
        return ring.zigzag_permutation(length, n) if n > 1 else None

    def attention(self, q_bthk, k_bsgk, v_bsgv, segment_ids_bt, *, scale: float, backend: str, kv_heads: str):
        axes = ring.AttentionAxes(
            batch=self.axis("batch"),
            length=self.axis("length"),
            heads=self.axis("act_heads"),
            kv_heads=self.axis(kv_heads),
            kv_heads_name=kv_heads,
        )
        return ring.sharded_attention(
            q_bthk, k_bsgk, v_bsgv, segment_ids_bt, mesh=self.mesh, axes=axes, scale=scale, backend=backend
        )

    def paged_attention(self, q_thk, cache, layer, *, scale: float, fmt: paged.RowFormat, backend: str):
        """Under GSPMD for the reference; one kernel call per tensor-parallel shard of the query heads
        (and of the kv heads, for GQA) for the others, which GSPMD cannot partition."""
        heads = self.axis("act_heads")
        if heads is None or paged.PAGED.resolve(backend) == "reference":
            return super().paged_attention(q_thk, cache, layer, scale=scale, fmt=fmt, backend=backend)
        meta = (cache.kv_lens, cache.page_table, cache.cu_q_lens, cache.num_seqs, jnp.asarray(layer, jnp.int32))
        kv_split = heads if cache.pool.shape[3] > 1 else None
        q_spec, pool_spec = PartitionSpec(None, heads, None), PartitionSpec(None, None, None, kv_split, None)

        def local(q, pool, *meta):
            return paged.ragged_paged_attention(q, pool, *meta, scale=scale, fmt=fmt, backend=backend)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(q_spec, pool_spec) + (PartitionSpec(),) * len(meta),
            out_specs=q_spec,
            check_vma=False,
        )(q_thk, cache.pool, *meta)

    def routed_experts(self, x, weights, ids, w_gate_edf, w_up_edf, w_down_efd, *, runtime):
        if self.axis("expert") is None:
            return super().routed_experts(x, weights, ids, w_gate_edf, w_up_edf, w_down_efd, runtime=runtime)
        if self.axis("embed") is not None:
            raise ShardingRuleError(
                "routed experts split over both 'expert' and 'embed' (D) are not supported: "
                "expert parallelism keeps D whole (the fsdp strategies leave 'expert' unsplit)"
            )
        axes = experts.ExpertAxes(
            expert=self.axis("expert"), mlp=self.axis("mlp"), batch=self.axis("batch"), length=self.axis("length")
        )
        return experts.expert_parallel_swiglu(
            x,
            weights,
            ids,
            w_gate_edf,
            w_up_edf,
            w_down_efd,
            mesh=self.mesh,
            axes=axes,
            backend=runtime.grouped_matmul,
            block=runtime.grouped_block_rows,
            dispatch=runtime.expert_dispatch,
            capacity=runtime.expert_capacity,
        )

    def shardings(self, abstract_state):
        return state_shardings(abstract_state, self)


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
        rows.append(
            {
                "path": "/".join(map(str, path)),
                "shape": tuple(var.shape),
                "names": names,
                "spec": tuple(spec) + (None,) * (len(var.shape) - len(spec)),
                "bytes_per_device": bytes_per_device(var.shape, var.dtype, spec, mesh_shape),
            }
        )
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
