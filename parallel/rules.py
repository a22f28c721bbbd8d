"""Logical-axis rules: how the model's named dimensions map onto mesh axes.

Model code names dimensions (``embed``, ``heads``, ``mlp``, ``expert``, ...); a strategy is
a small table from those names to mesh axes (``data``, ``tensor``, ``sequence``) or
``None`` (replicated). In scaling-book notation the default ``DP_TP`` table shards
``W_in[D, F_tensor]``, ``W_out[F_tensor, D]``, attention over heads, experts over ``data``
and activations ``x[B_data, T_sequence, D]``.

Every logical name the model uses must appear in the table: a missing name is an error,
never a silent replication, and so is a mesh axis used twice in one array.
"""

from __future__ import annotations

from typing import Iterable

from jax.sharding import PartitionSpec

Rules = tuple[tuple[str, str | None], ...]

DP_TP: Rules = (
    ("batch", "data"), ("length", "sequence"), ("layers", None),
    ("embed", None), ("vocab", "tensor"), ("mlp", "tensor"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("qk", None), ("v", None), ("rope", None),
    ("q_lora", None), ("kv_lora", None), ("norm", None), ("expert", "data"),
)

DP: Rules = tuple((name, "data" if name == "batch" else None) for name, _ in DP_TP)

STRATEGIES: dict[str, Rules] = {"dp": DP, "dp_tp": DP_TP}


class ShardingRuleError(ValueError):
    pass


def logical_to_spec(axes: Iterable[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array's logical axes; raises on an unmapped name or a reused mesh axis."""
    table = dict(rules)
    axes = tuple(axes)
    mesh_axes = []
    for name in axes:
        if name is None:
            mesh_axes.append(None)
            continue
        if name not in table:
            raise ShardingRuleError(
                f"logical axis '{name}' has no rule; add it to the strategy (mapped names: {', '.join(table)})"
            )
        mesh_axes.append(table[name])
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ShardingRuleError(f"logical axes {axes} map mesh axes {mesh_axes}: a mesh axis may shard one dim only")
    return PartitionSpec(*mesh_axes)
