"""Logical-axis rules: how the model's named dimensions map onto mesh axes.

Model code names dimensions; a *strategy* is one small table from those names to a mesh axis
(``data``, ``tensor``, ``sequence``) or ``None`` (replicated). ``mesh.strategy`` in config
picks one. Parameter names: ``layers`` (the scan axis), ``embed`` (D), ``vocab`` (N),
``mlp`` (F), ``heads`` (H), ``kv_heads`` (G), ``qk``/``v``/``rope`` (head dims), ``q_lora`` /
``kv_lora`` (MLA ranks), ``expert`` (E), ``norm``. Activation names: ``batch`` (B), ``length``
(T), ``act_embed``, ``act_heads``, ``act_kv_heads``, ``act_mlp``. Activations have their own names so that FSDP
can shard weights over ``data`` along D while the residual stream x[B, T, D] is sharded over
``data`` along B.

In scaling-book notation (subscript = mesh axis; X = data, Y = tensor, Z = sequence):

====================  ===============================================================
``dp``                x[B_X, T, D]; every weight replicated (W_in[D, F]).
``fsdp``              x[B_X, T, D]; every weight sharded over data along D: W_in[D_X, F],
                      W_out[F, D_X], experts W[E, D_X, F], embedding [N, D_X] (ZeRO-3:
                      XLA all-gathers each layer's weights when it runs).
``tp``                x[B_X, T, D]; Megatron tensor parallelism: W_in[D, F_Y], W_out[F_Y, D],
                      attention over heads (W_q[D, H_Y, K], W_o[H_Y, V, D]), LM head [D, N_Y],
                      experts W[E, D, F_Y].
``ep_tp``             ``tp`` plus experts over data: W_gate[E_X, D, F_Y]; tokens reach their
                      experts through the expert-parallel shard_map island.
``dp_tp_sp``          ``ep_tp`` plus sequence parallelism: x[B_X, T_Z, D]; attention runs as
                      ring attention over Z.
``fsdp_tp_sp``        ``fsdp`` + ``tp`` + sequence: x[B_X, T_Z, D], W_in[D_X, F_Y], experts
                      W[E, D_X, F_Y] (the memory-lean choice for the largest models).
====================  ===============================================================

Every logical name the model uses must resolve in the table: a missing name, a mesh axis
the mesh does not have, one mesh axis on two dims of one array, a mesh axis of size > 1 that
no name maps to, or a dim that the mesh axis does not divide are errors, never silent
replication.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from jax.sharding import PartitionSpec

Rules = tuple[tuple[str, str | None], ...]

PARAM_NAMES = (
    "layers",
    "embed",
    "vocab",
    "mlp",
    "heads",
    "kv_heads",
    "qk",
    "v",
    "rope",
    "q_lora",
    "kv_lora",
    "expert",
    "norm",
)
ACTIVATION_NAMES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp")


def _table(**mapped: str) -> Rules:
    return tuple((name, mapped.get(name)) for name in PARAM_NAMES + ACTIVATION_NAMES)


_TP = dict(
    heads="tensor",
    kv_heads="tensor",
    mlp="tensor",
    vocab="tensor",
    act_heads="tensor",
    act_kv_heads="tensor",
    act_mlp="tensor",
)

STRATEGIES: dict[str, Rules] = {
    "dp": _table(batch="data"),
    "fsdp": _table(batch="data", embed="data"),
    "tp": _table(batch="data", **_TP),
    "ep_tp": _table(batch="data", expert="data", **_TP),
    "dp_tp_sp": _table(batch="data", length="sequence", expert="data", **_TP),
    "fsdp_tp_sp": _table(batch="data", length="sequence", embed="data", **_TP),
}

DP, DP_TP = STRATEGIES["dp"], STRATEGIES["ep_tp"]


class ShardingRuleError(ValueError):
    pass


def strategy(name: str) -> Rules:
    if name not in STRATEGIES:
        raise ShardingRuleError(f"unknown sharding strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


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


def check_rules(rules: Rules, mesh_shape: Mapping[str, int], name: str = "strategy") -> None:
    """Every mapped mesh axis exists, and every mesh axis with more than one device is used."""
    targets = {axis for _, axis in rules if axis is not None}
    unknown = targets - set(mesh_shape)
    if unknown:
        raise ShardingRuleError(
            f"{name} maps onto mesh axes {sorted(unknown)} that the mesh {dict(mesh_shape)} does not have"
        )
    idle = [axis for axis, size in mesh_shape.items() if size > 1 and axis not in targets]
    if idle:
        users = [s for s, r in STRATEGIES.items() if set(idle) <= {a for _, a in r if a}]
        raise ShardingRuleError(
            f"mesh axes {idle} have {[mesh_shape[a] for a in idle]} devices but {name} maps "
            f"nothing onto them (they would only hold copies); set them to 1 or choose a "
            f"strategy that uses them: {', '.join(users) or 'none'}"
        )


def check_divisible(shape: tuple[int, ...], spec: PartitionSpec, mesh_shape: Mapping[str, int], what: str) -> None:
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh_shape[axis]:
            raise ShardingRuleError(
                f"{what} {shape} cannot be split over mesh axis '{axis}' "
                f"({mesh_shape[axis]} devices): {dim} is not divisible by {mesh_shape[axis]}; "
                "change the mesh or the strategy (mesh.strategy)"
            )
