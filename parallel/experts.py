"""Expert parallelism, dropless: the routed experts as a ``jax.shard_map`` island.

Under a layout whose ``expert`` logical axis is split over a mesh axis X (n devices), each
device holds E/n experts, W_gate/W_up [E_X, D, F_Y] and W_down [E_X, F_Y, D] (Y = the
``mlp`` axis, if split), while the tokens x [B, T, D] are split over the token axes (the
``batch`` and ``length`` mesh axes: x[B_X, T_Z, D]; flat rows x [M, D] split over
(data, sequence) work too). Each device flattens only its own [B/X, T/Z] block, so no row
moves between devices before the island. The island, per device:

1. all-gathers its token rows and their routing (weights, ids [M, k]) over X: every device
   of an expert-axis group now sees the same n·M/n_tok rows;
2. computes only the (token, expert) pairs routed to its own experts
   (``model.experts.routed_swiglu`` with ``first_expert = index_X · E/n``: other pairs sort
   past the groups and cost no matmul), each weighted by its routing weight;
3. reduce-scatters the [n·M_local, D] partial outputs over X back to the token owners
   (a token's k experts may live on k devices: the sum over X adds their contributions),
   and, with F split over Y, psums the partial down-projections over Y.

Why all-gather + reduce-scatter and not all_to_all: dispatching tokens with a fixed-size
all_to_all needs a static per-destination buffer, i.e. a capacity factor that drops pairs
when an expert is over-subscribed. Here every shape is static, nothing is dropped and the
result is exact: each device sorts the n·M_local·k pairs it sees, and the blocked grouped
matmul's buffer is sized for the worst case (all of them on this device's experts; only the
blocks in use are computed). The price is communication: per device, the all-gather brings
(n-1)·M_local token rows of width D and the reduce-scatter sends as many partial outputs back,
where an all_to_all would move about k·M_local·(n-1)/n routed rows each way: a ratio of
about n/k, so no worse for n <= k (DeepSeek-V3 routes k = 8), and both collectives are ones
XLA schedules well. At larger n the variable-size exchange is ``jax.lax.ragged_all_to_all``
(send counts first, then exactly the routed rows, into a worst-case-sized output), the
TPU-scale alternative; XLA:CPU in jax 0.10 does not implement it ("HLO opcode
ragged-all-to-all is not supported by XLA:CPU ThunkEmitter"), so it is not used here.

Autodiff: the body runs with ``check_vma=True``. Weights are replicated over the token
axes they are not split on (e.g. ``sequence``), tokens over ``mlp``; each operand is cast to
varying over those axes before use, and the transpose of that cast is a psum: dW summed over
the token axes, dx over the F slices. The all-gather / reduce-scatter pair transpose into
each other, so token gradients come back to their owners.

Constraints (checked, with the offending sizes in the error): E divisible by n, M by the
product of the token axes' sizes, F by the ``mlp`` axis; D is not split (``embed`` unmapped:
the fsdp strategies, which split D, leave ``expert`` unsplit and never enter the island), and
``mlp`` may not share a mesh axis with the tokens.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from model.experts import routed_swiglu
from parallel.layout import Layout
from parallel.rules import ShardingRuleError, check_divisible


def _token_axes(layout: Layout) -> tuple[str, ...]:
    """Mesh axes the token rows M are split over, major first (batch, then length)."""
    return tuple(a for a in (layout.axis("batch"), layout.axis("length")) if a is not None)


def expert_parallel_swiglu(x_md, weights_mk, ids_mk, w_gate_edf, w_up_edf, w_down_efd, *, layout: Layout,
                           impl: str = "auto", block: int = 128):
    """Dropless routed experts, split over ``layout.axis("expert")``. Same contract as
    ``model.experts.routed_swiglu`` on the global arrays: x [B, T, D] or [M, D] -> y of x's
    shape, split like x."""
    ex, mlp = layout.axis("expert"), layout.axis("mlp")
    if ex is None:
        raise ShardingRuleError("expert_parallel_swiglu needs a layout that splits 'expert' over a mesh axis")
    if layout.axis("embed") is not None:
        raise ShardingRuleError("routed experts split over both 'expert' and 'embed' (D) are not supported: "
                                "expert parallelism keeps D whole (the fsdp strategies leave 'expert' unsplit)")
    tokens = _token_axes(layout)
    if mlp is not None and mlp in tokens:
        raise ShardingRuleError(f"'mlp' and the tokens are both split over mesh axis '{mlp}': the F-partial "
                                "sums of different tokens cannot be added")
    mesh_shape = dict(layout.mesh.shape)
    w_in, w_out = P(ex, None, mlp), P(ex, mlp, None)
    if x_md.ndim == 3:  # [B, T, D]: batch and length keep their own axes
        tok = P(layout.axis("batch"), layout.axis("length"), None)
        check_divisible(x_md.shape, tok, mesh_shape, "MoE tokens x [B, T, D]")
    else:
        tok = P(tokens or None, None)
        if x_md.shape[0] % math.prod(mesh_shape[a] for a in tokens):
            raise ShardingRuleError(f"{x_md.shape[0]} token rows cannot be split over mesh axes {tokens} "
                                    f"({[mesh_shape[a] for a in tokens]} devices)")
    check_divisible(w_gate_edf.shape, w_in, mesh_shape, "routed expert weights W_gate/W_up")
    check_divisible(w_down_efd.shape, w_out, mesh_shape, "routed expert weights W_down")
    e_local = w_gate_edf.shape[0] // mesh_shape[ex]
    gather = ex in tokens  # else every device of the expert group already holds the same tokens
    # Inside, every operand is made varying over every axis any of them is split on; the
    # transpose of that cast is a psum, which sums e.g. dW over the token axes it is replicated on.
    split = tuple(dict.fromkeys(a for a in (*tokens, ex, mlp) if a is not None))
    token_missing = tuple(a for a in split if a not in tokens)
    weight_missing = tuple(a for a in split if a not in (ex, mlp))

    def island(x, w, ids, wg, wu, wd):
        lead = x.shape[:-1]
        x, w, ids = (a.reshape(-1, a.shape[-1]) for a in (x, w, ids))  # this device's rows only
        x, w, ids = (jax.lax.pcast(a, token_missing, to="varying") for a in (x, w, ids))
        wg, wu, wd = (jax.lax.pcast(a, weight_missing, to="varying") for a in (wg, wu, wd))
        if gather:
            x, w, ids = (jax.lax.all_gather(a, ex, axis=0, tiled=True) for a in (x, w, ids))
        first = jax.lax.axis_index(ex) * e_local
        y = routed_swiglu(x, w, ids, wg, wu, wd, impl=impl, block=block, first_expert=first)
        y = jax.lax.psum_scatter(y, ex, scatter_dimension=0, tiled=True) if gather else jax.lax.psum(y, ex)
        y = y if mlp is None else jax.lax.psum(y, mlp)  # the F-partial down-projections
        return y.reshape(lead + y.shape[-1:])

    return jax.shard_map(island, mesh=layout.mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                         check_vma=True)(x_md, weights_mk, ids_mk, w_gate_edf, w_up_edf, w_down_efd)
