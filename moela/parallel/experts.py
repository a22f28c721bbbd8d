"""Expert parallelism, dropless: the routed experts as a ``jax.shard_map`` island.

When a layout's ``expert`` logical axis is split over a mesh axis X (n devices), each
device holds E/n experts, W_gate/W_up [E_X, D, F_Y] and W_down [E_X, F_Y, D] (Y = the
``mlp`` axis, if split), while the tokens x [B, T, D] are split over the token axes (the
``batch`` and ``length`` mesh axes: x[B_X, T_Z, D]; flat rows x [M, D] split over
(data, sequence) work too). Each device flattens only its own [B/X, T/Z] block, so no row
moves between devices before the island. Two ways to bring tokens and experts together
(``runtime.expert_dispatch``, the ``DISPATCH`` backends), both dropless, exact and static-shaped
(no capacity factor):

``ring`` (default): each device's token block (rows, routing weights, ids) tours the n devices
of X with ``ppermute``, carrying an accumulator of its output; at every stop the host's E/n
experts add their part (``kernels.grouped.routed_swiglu`` with ``first_expert = index_X · E/n``:
pairs of other experts sort past the groups and cost no matmul); one last move brings the
finished block home. The backward (``jax.custom_vjp``) tours again with the output cotangent,
recomputing each stop's part under ``jax.vjp``: dx and d(routing weights) travel with the
block, each device keeps its own experts' weight gradients. Only one visiting block is live
at a time, so memory is that of the local tokens, whatever n is.

``gather``: all-gather the token rows and routing over X, compute the pairs of the local
experts among all n·M_local rows, reduce-scatter the partial outputs back to the owners. Two
collectives instead of n hops (better latency at small n), but every device sorts n·M·k pairs:
at DeepSeek-V3 scale (n = 64) that is hundreds of GiB (``python -m moela.planner``).

With F split over Y, the partial down-projections are psummed over Y. Compared with a token
all_to_all (which moves about k·M_local·(n-1)/n routed rows each way), both move (n-1)·M_local
rows of width D each way: a ratio of about n/k, no worse for n <= k (DeepSeek-V3 routes k = 8);
``jax.lax.ragged_all_to_all`` (send counts first, then exactly the routed rows) is the
TPU-scale alternative, but XLA:CPU in jax 0.10 does not implement it ("HLO opcode
ragged-all-to-all is not supported by XLA:CPU ThunkEmitter"), so it cannot be tested here.

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
from functools import partial

import jax
from jax.sharding import PartitionSpec as P

import dataclasses

from jax.sharding import Mesh

from moela.kernels.grouped import routed_swiglu
from moela.kernels.registry import ANY, Backends
from moela.parallel.ring import shift
from moela.parallel.rules import ShardingRuleError, check_divisible


@dataclasses.dataclass(frozen=True)
class ExpertAxes:
    """The mesh axes (None: not split) of the experts E, their hidden dim F, and the tokens'
    batch and length."""

    expert: str | None
    mlp: str | None = None
    batch: str | None = None
    length: str | None = None

    @property
    def tokens(self) -> tuple[str, ...]:
        """Mesh axes the token rows M are split over, major first (batch, then length)."""
        return tuple(a for a in (self.batch, self.length) if a is not None)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring_experts(x_md, w_mk, ids_mk, wg, wu, wd, axis, e_local, backend, block):
    return _ring_forward(x_md, w_mk, ids_mk, wg, wu, wd, axis, e_local, backend, block)


def _own_experts(axis, e_local, backend, block):
    first = jax.lax.axis_index(axis) * e_local
    return lambda x, w, ids, wg, wu, wd: routed_swiglu(
        x, w, ids, wg, wu, wd, backend=backend, block=block, first_expert=first
    )


def _ring_forward(x_md, w_mk, ids_mk, wg, wu, wd, axis, e_local, backend, block):
    """Each device's token block visits every device of the ring with an accumulator of its
    output; each device adds what its own experts make of the visitor. After n - 1 moves every
    block has seen all experts; one more move brings the finished outputs home."""
    n = jax.lax.axis_size(axis)
    experts = _own_experts(axis, e_local, backend, block)
    visitor = (x_md, w_mk, ids_mk)
    y_md = experts(*visitor, wg, wu, wd)
    for _ in range(n - 1):
        visitor, y_md = shift((visitor, y_md), axis, n)
        y_md = y_md + experts(*visitor, wg, wu, wd)
    return shift(y_md, axis, n) if n > 1 else y_md


def _ring_fwd(x_md, w_mk, ids_mk, wg, wu, wd, axis, e_local, backend, block):
    return (
        _ring_forward(x_md, w_mk, ids_mk, wg, wu, wd, axis, e_local, backend, block),
        (x_md, w_mk, ids_mk, wg, wu, wd),
    )


def _ring_bwd(axis, e_local, backend, block, residuals, dy_md):
    """The same tour again, the visitor now carrying its output cotangent and accumulators for
    its dx and d(routing weights); each device recomputes its experts' part for the visitor
    (``jax.vjp``), adds to the visitor's accumulators and keeps its own experts' weight
    gradients. Only one visitor's buffers are live at a time."""
    x_md, w_mk, ids_mk, wg, wu, wd = residuals
    n = jax.lax.axis_size(axis)
    experts = _own_experts(axis, e_local, backend, block)

    def visit(xb, wb, idb, dyb):
        _, pullback = jax.vjp(lambda x, w, g, u, d: experts(x, w, idb, g, u, d), xb, wb, wg, wu, wd)
        return pullback(dyb.astype(x_md.dtype))

    dx, dw, dwg, dwu, dwd = visit(x_md, w_mk, ids_mk, dy_md)
    visitor = (x_md, w_mk, ids_mk, dy_md)
    for _ in range(n - 1):
        visitor, dx, dw = shift((visitor, dx, dw), axis, n)
        ddx, ddw, g, u, d = visit(*visitor)
        dx, dw, dwg, dwu, dwd = dx + ddx, dw + ddw, dwg + g, dwu + u, dwd + d
    if n > 1:
        dx, dw = shift((dx, dw), axis, n)
    return dx, dw, None, dwg, dwu, dwd


_ring_experts.defvjp(_ring_fwd, _ring_bwd)


def _by_ring(x, w, ids, wg, wu, wd, *, axis, e_local, backend, block):
    """Inside the island: this device's tokens tour the expert axis (module docstring)."""
    return _ring_experts(x, w, ids, wg, wu, wd, axis, e_local, backend, block)


def _by_gather(x, w, ids, wg, wu, wd, *, axis, e_local, backend, block):
    """Inside the island: all-gather the expert axis' tokens, compute the local experts' pairs,
    reduce-scatter the partial outputs back to their owners."""
    x, w, ids = (jax.lax.all_gather(a, axis, axis=0, tiled=True) for a in (x, w, ids))
    y = _own_experts(axis, e_local, backend, block)(x, w, ids, wg, wu, wd)
    return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)


DISPATCH = Backends("expert dispatch", {"ring": _by_ring, "gather": _by_gather}, auto={ANY: "ring"})


def expert_parallel_swiglu(
    x_md,
    weights_mk,
    ids_mk,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    *,
    mesh: Mesh,
    axes: ExpertAxes,
    backend: str = "auto",
    block: int = 128,
    dispatch: str = "auto",
):
    """Dropless routed experts, split over mesh axis ``axes.expert``. Same contract as
    ``kernels.grouped.routed_swiglu`` on the global arrays: x [B, T, D] or [M, D] -> y of x's
    shape, split like x."""
    ex, mlp, tokens = axes.expert, axes.mlp, axes.tokens
    exchange = DISPATCH[dispatch]
    if ex is None:
        raise ShardingRuleError("expert_parallel_swiglu needs experts split over a mesh axis (axes.expert)")
    if mlp is not None and mlp in tokens:
        raise ShardingRuleError(
            f"'mlp' and the tokens are both split over mesh axis '{mlp}': the F-partial "
            "sums of different tokens cannot be added"
        )
    mesh_shape = dict(mesh.shape)
    w_in, w_out = P(ex, None, mlp), P(ex, mlp, None)
    if x_md.ndim == 3:  # [B, T, D]: batch and length keep their own axes
        tok = P(axes.batch, axes.length, None)
        check_divisible(x_md.shape, tok, mesh_shape, "MoE tokens x [B, T, D]")
    else:
        tok = P(tokens or None, None)
        if x_md.shape[0] % math.prod(mesh_shape[a] for a in tokens):
            raise ShardingRuleError(
                f"{x_md.shape[0]} token rows cannot be split over mesh axes {tokens} "
                f"({[mesh_shape[a] for a in tokens]} devices)"
            )
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
        if not gather:  # the expert group already shares its tokens: add the groups' parts
            y = jax.lax.psum(_own_experts(ex, e_local, backend, block)(x, w, ids, wg, wu, wd), ex)
        else:
            y = exchange(x, w, ids, wg, wu, wd, axis=ex, e_local=e_local, backend=backend, block=block)
        y = y if mlp is None else jax.lax.psum(y, mlp)  # the F-partial down-projections
        return y.reshape(lead + y.shape[-1:])

    return jax.shard_map(island, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok, check_vma=True)(
        x_md, weights_mk, ids_mk, w_gate_edf, w_up_edf, w_down_efd
    )
