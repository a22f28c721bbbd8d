"""Expert parallelism: the routed experts as a ``jax.shard_map`` island.

When a layout's ``expert`` logical axis is split over a mesh axis X (n devices), each
device holds E/n experts, W_gate/W_up [E_X, D, F_Y] and W_down [E_X, F_Y, D] (Y = the
``mlp`` axis, if split), while the tokens x [B, T, D] are split over the token axes (the
``batch`` and ``length`` mesh axes: x[B_X, T_Z, D]; flat rows x [M, D] split over
(data, sequence) work too). Each device flattens only its own [B/X, T/Z] block, so no row
moves between devices before the island. Three ways to bring tokens and experts together
(``runtime.expert_dispatch``, the ``DISPATCH`` backends), all exact and static-shaped; ``ring``
and ``gather`` are always dropless, ``all_to_all`` is dropless at ``runtime.expert_capacity = 0``.
Below, M = a device's token rows, k = experts per token, s = bytes per value of the compute dtype;
bytes are those a device sends to other devices per MoE layer forward (``dispatch_bytes``; the
backward sends as much again).

``ring`` (``auto`` on CPU): each device's token block (rows, routing weights, ids) tours the n
devices of X with ``ppermute``, carrying an accumulator of its output; at every stop the host's E/n
experts add their part (``kernels.grouped.routed_swiglu`` with ``first_expert = index_X · E/n``:
pairs of other experts sort past the groups and cost no matmul); one last move brings the
finished block home. The backward (``jax.custom_vjp``) tours again with the output cotangent,
recomputing each stop's part under ``jax.vjp``: dx and d(routing weights) travel with the
block, each device keeps its own experts' weight gradients. Only one visiting block is live
at a time, so memory is that of the local tokens, whatever n is. Moves (n-1)·M rows of
(2·D·s + 8k) bytes (x and the accumulator, weights and ids) plus the last M·D·s home.

``gather``: all-gather the token rows and routing over X, compute the pairs of the local
experts among all n·M_local rows, reduce-scatter the partial outputs back to the owners. Two
collectives instead of n hops (better latency at small n), but every device sorts n·M·k pairs:
at DeepSeek-V3 scale (n = 64) that is hundreds of GiB (``python -m moela.planner``). Moves
(n-1)·M rows of (D·s + 8k) in and (n-1)·M rows of D·s back.

``all_to_all``: each device sends each of its M·k (token, expert) pairs to the device holding
the expert, and only those: the pairs are sorted by destination (expert // (E/n), stable), sent
with one collective (rows and expert ids), the receiver runs its E/n experts' grouped SwiGLU on
the rows it got (padding rows carry id -1, which sorts past its groups), sends the results back
with the reverse collective, and the sender scales each by its routing weight and adds it to its
token. About k·M·(n-1)/n rows of D·s go each way (plus 4 bytes of id per row): a ratio of about
k/n to ring's (n-1)·M, so it wins for n > k (DeepSeek-V3 routes k = 8 over n = 64): ``auto``
on TPU and GPU. Autodiff runs through it (both collectives transpose into their reverse). Two
variants of one function (``ragged``; default from the platform of the mesh's devices, cpu ->
padded):

* ragged (TPU, GPU): ``jax.lax.ragged_all_to_all`` sends exactly the routed rows. The per-peer
  counts are all-gathered first (n ints a device), from which every device reads where its rows
  land on each receiver and how many the receiver takes. The receive buffer is static: dropless,
  n·M·min(k, E/n) rows (every device's pairs on one device's experts: a token's k experts are
  distinct, so at most E/n of them are on one device); with ``runtime.expert_capacity`` c > 0,
  ceil(c·M·k) rows (c × the average), rounded up to 8. At DeepSeek-V3 scale (n = 64, M = 32K
  rows, E/n = 4) the dropless buffer is 8M rows of D: hundreds of GiB, so large expert axes set
  a capacity (MaxText's expert-parallel DeepSeek-V3 recipe runs at capacity 1.0) or use ``ring``.
* padded (CPU: XLA:CPU has no ragged-all-to-all, "HLO opcode ragged-all-to-all is not supported
  by XLA:CPU"): ``jax.lax.all_to_all`` of a fixed number of rows per peer, M·min(k, E/n)
  (dropless) or ceil(c·M·k/n) rounded up to 8, so send and receive buffers are n times that
  each (dropless: n times the routed rows moved, padding included: CPU tests and small meshes).

Pairs beyond a buffer (more rows for one peer than its capacity, or, ragged, rows that arrive
after the receiver's buffer is full) are dropped: they contribute zero, and their count is
returned (the ``moe_dropped_pairs`` training metric). Each buffer holds rows of D in the compute
dtype; the sorted pairs (rows, ids, weights) are a further M·k rows.

With F split over Y, the partial down-projections are psummed over Y.

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

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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


def _by_ring(x, w, ids, wg, wu, wd, *, axis, e_local, backend, block, capacity, ragged):
    """Inside the island: this device's tokens tour the expert axis (module docstring). Dropless:
    returns (y, None)."""
    del capacity, ragged  # dropless, one collective on every platform
    return _ring_experts(x, w, ids, wg, wu, wd, axis, e_local, backend, block), None


def _by_gather(x, w, ids, wg, wu, wd, *, axis, e_local, backend, block, capacity, ragged):
    """Inside the island: all-gather the expert axis' tokens, compute the local experts' pairs,
    reduce-scatter the partial outputs back to their owners. Dropless: returns (y, None)."""
    del capacity, ragged
    x, w, ids = (jax.lax.all_gather(a, axis, axis=0, tiled=True) for a in (x, w, ids))
    y = _own_experts(axis, e_local, backend, block)(x, w, ids, wg, wu, wd)
    return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True), None


def buffer_rows(pairs: int, n: int, capacity: float, ragged: bool, most: int | None = None) -> int:
    """Static rows of the ``all_to_all`` buffers for a device with ``pairs`` = M·k routed pairs on
    an expert axis of n devices: per peer (padded) or the whole receive buffer (ragged). ``most``:
    the most pairs one sender can send one device, M·min(k, E/n) (a token's k experts are
    distinct, so at most E/n of them live on one device; default M·k). Capacity 0: the worst case
    (``most`` per peer; n·``most`` received), dropless. c > 0: c times the average (c·M·k/n per
    peer; c·M·k received), rounded up to a multiple of 8, at most the worst case."""
    most = pairs if most is None else most
    worst = n * most if ragged else most
    if capacity <= 0:
        return worst
    rows = math.ceil(capacity * pairs / (1 if ragged else n))
    return min(worst, -(-rows // 8) * 8)


def _padded_exchange(x_pd, ids_p, dest_p, counts_n, starts_n, experts, *, axis, n, cap):
    """The sorted pairs through ``all_to_all`` with ``cap`` rows per peer: pair p (rank r among
    those for its destination) goes to slot dest·cap + r, or nowhere once r >= cap. Returns the
    experts' rows y [P, D] in the pairs' order (zero for dropped pairs) and each pair's kept flag."""
    pairs = ids_p.shape[0]
    rank_p = jnp.arange(pairs, dtype=jnp.int32) - starts_n[dest_p]
    keep_p = rank_p < cap
    slot_p = jnp.where(keep_p, dest_p * cap + rank_p, n * cap)  # n·cap: out of bounds, dropped
    x_send = jnp.zeros_like(x_pd, shape=(n * cap, x_pd.shape[1])).at[slot_p].set(x_pd, mode="drop")
    ids_send = jnp.full_like(ids_p, -1, shape=(n * cap,)).at[slot_p].set(ids_p, mode="drop")
    x_recv, ids_recv = (jax.lax.all_to_all(a, axis, 0, 0, tiled=True) for a in (x_send, ids_send))
    y_back = jax.lax.all_to_all(experts(x_recv, ids_recv), axis, 0, 0, tiled=True)
    return y_back.at[slot_p].get(mode="fill", fill_value=0), keep_p


def _ragged_exchange(x_pd, ids_p, dest_p, counts_n, starts_n, experts, *, axis, n, cap):
    """The sorted pairs through ``ragged_all_to_all`` into a receive buffer of ``cap`` rows. The
    all-gathered counts [sender, receiver] say where each sender's rows land on each receiver
    (after those of lower-index senders) and how many fit; the rest are dropped."""
    pairs = ids_p.shape[0]
    me = jax.lax.axis_index(axis)
    counts_nn = jax.lax.all_gather(counts_n, axis)  # [sender, receiver]
    at_nn = jnp.cumsum(counts_nn, axis=0) - counts_nn  # where sender i's rows start on receiver j
    sizes_nn = jnp.clip(cap - at_nn, 0, counts_nn)  # how many of them fit
    at_nn = jnp.where(sizes_nn > 0, at_nn, 0)  # empty slices at offset 0 (always in bounds)
    starts_nn = jnp.cumsum(counts_nn, axis=1) - counts_nn  # sender i's first pair for receiver j
    send, recv = sizes_nn[me], sizes_nn[:, me]

    def there(a, fill):
        out = jnp.full_like(a, fill, shape=(cap,) + a.shape[1:])
        return jax.lax.ragged_all_to_all(a, out, starts_n, send, at_nn[me], recv, axis_name=axis)

    y_recv = experts(there(x_pd, 0), there(ids_p, -1))
    back = jnp.zeros_like(y_recv, shape=(pairs, y_recv.shape[1]))  # dropped pairs stay zero
    y_pd = jax.lax.ragged_all_to_all(y_recv, back, at_nn[:, me], recv, starts_nn[:, me], send, axis_name=axis)
    rank_p = jnp.arange(pairs, dtype=jnp.int32) - starts_n[dest_p]
    return y_pd, rank_p < send[dest_p]


def _by_all_to_all(x, w, ids, wg, wu, wd, *, axis, e_local, backend, block, capacity, ragged):
    """Inside the island: each (token, expert) pair goes to its expert's device and back (module
    docstring). Returns (y [M, D], this device's dropped pairs)."""
    n = jax.lax.axis_size(axis)
    m, k = ids.shape
    ids_p = ids.reshape(-1)
    dest_p = ids_p // e_local
    order_p = jnp.argsort(dest_p, stable=True)
    token_p, ids_p, dest_p = order_p // k, ids_p[order_p], dest_p[order_p]
    counts_n = jnp.bincount(dest_p, length=n).astype(jnp.int32)
    starts_n = jnp.cumsum(counts_n) - counts_n
    own = _own_experts(axis, e_local, backend, block)

    def experts(x_rd, ids_r):  # the received rows, one pair each: unweighted
        return own(x_rd, jnp.ones_like(ids_r, jnp.float32)[:, None], ids_r[:, None], wg, wu, wd)

    exchange = _ragged_exchange if ragged else _padded_exchange
    cap = buffer_rows(m * k, n, capacity, ragged, most=m * min(k, e_local))
    y_pd, keep_p = exchange(
        jnp.take(x, token_p, axis=0), ids_p, dest_p, counts_n, starts_n, experts, axis=axis, n=n, cap=cap
    )
    weight_p = w.reshape(-1)[order_p]
    y_pd = y_pd * weight_p[:, None].astype(y_pd.dtype)
    y = jnp.zeros_like(x).at[token_p].add(y_pd.astype(x.dtype))
    return y, m * k - jnp.sum(keep_p, dtype=jnp.int32)


DISPATCH = Backends(
    "expert dispatch",
    {"ring": _by_ring, "gather": _by_gather, "all_to_all": _by_all_to_all},
    # Where the exchange is ragged it moves k·M·(n-1)/n rows each way against the ring's (n-1)·M,
    # never more (planner.steptime); on CPU the padded exchange's dropless buffers move n·k·M.
    auto={ANY: "ring", "tpu": "all_to_all", "gpu": "all_to_all"},
)


def dispatch_bytes(
    dispatch: str,
    *,
    rows: int,
    k: int,
    n: int,
    d_model: int,
    itemsize: int,
    capacity: float = 0.0,
    ragged: bool = True,
    local_experts: int | None = None,
) -> int:
    """Bytes one device sends to the other devices of an expert axis of n devices in one MoE layer's
    forward (the backward sends as much again), for ``rows`` = M token rows of ``d_model`` values of
    ``itemsize`` bytes, k routed experts a token (float32 weights, int32 ids). ``all_to_all`` ragged
    counts the rows a uniform routing sends (k·M·(n-1)/n each way, at most what the capacity lets
    through), padded the whole buffers (n-1 peers' capacity each way, ``buffer_rows`` with E/n =
    ``local_experts``); both add the ids and, ragged, the all-gathered counts."""
    row = d_model * itemsize
    name = DISPATCH.resolve(dispatch)
    if n == 1:
        return 0
    if name == "ring":  # n-1 hops of (x, weights, ids, y accumulator), then y home
        return (n - 1) * rows * (2 * row + 8 * k) + rows * row
    if name == "gather":  # all-gather (x, weights, ids), reduce-scatter y
        return (n - 1) * rows * (2 * row + 8 * k)
    pairs = rows * k
    if not ragged:
        most = rows * min(k, local_experts or k)
        return (n - 1) * buffer_rows(pairs, n, capacity, False, most) * (2 * row + 4)
    sent = pairs * (n - 1) / n
    if capacity > 0:
        sent = min(sent, buffer_rows(pairs, n, capacity, True) * (n - 1) / n)
    return round(sent * (2 * row + 4)) + (n - 1) * n * 4


def default_ragged(mesh) -> bool:
    """Whether ``all_to_all`` runs ragged on this mesh: where its devices are not CPUs (an abstract
    mesh: its abstract device's platform, else the default backend's)."""
    if isinstance(mesh, Mesh):
        platform = mesh.devices.flat[0].platform
    else:
        device = getattr(mesh, "abstract_device", None)
        platform = device.platform if device is not None else jax.default_backend()
    return platform != "cpu"


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
    capacity: float = 0.0,
    ragged: bool | None = None,
):
    """Routed experts, split over mesh axis ``axes.expert``. Same contract as
    ``kernels.grouped.routed_swiglu`` on the global arrays: x [B, T, D] or [M, D] -> y of x's
    shape, split like x; returned with the number of (token, expert) pairs dropped (int32 [],
    over all devices; only ``all_to_all`` with ``capacity`` > 0 drops). ``ragged`` forces the
    ``all_to_all`` variant (default: ``default_ragged(mesh)``)."""
    ex, mlp, tokens = axes.expert, axes.mlp, axes.tokens
    exchange = DISPATCH[dispatch]
    ragged = default_ragged(mesh) if ragged is None else ragged
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
    options = {"capacity": capacity, "ragged": ragged}

    def island(x, w, ids, wg, wu, wd):
        lead = x.shape[:-1]
        x, w, ids = (a.reshape(-1, a.shape[-1]) for a in (x, w, ids))  # this device's rows only
        x, w, ids = (jax.lax.pcast(a, token_missing, to="varying") for a in (x, w, ids))
        wg, wu, wd = (jax.lax.pcast(a, weight_missing, to="varying") for a in (wg, wu, wd))
        dropped = None
        if not gather:  # the expert group already shares its tokens: add the groups' parts
            y = jax.lax.psum(_own_experts(ex, e_local, backend, block)(x, w, ids, wg, wu, wd), ex)
        else:
            y, dropped = exchange(
                x, w, ids, wg, wu, wd, axis=ex, e_local=e_local, backend=backend, block=block, **options
            )
        y = y if mlp is None else jax.lax.psum(y, mlp)  # the F-partial down-projections
        if dropped is None:
            dropped = jnp.zeros((), jnp.int32)
        else:  # every device's count once: the F slices of one token block hold the same count
            dropped = jax.lax.psum(dropped, split) // (1 if mlp is None else mesh_shape[mlp])
        return y.reshape(lead + y.shape[-1:]), dropped

    return jax.shard_map(
        island, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=(tok, P()), check_vma=True
    )(x_md, weights_mk, ids_mk, w_gate_edf, w_up_edf, w_down_efd)
