"""The routed experts' compute: grouped SwiGLU over rows sorted by expert, and the two ways a
MoE layer feeds it (``routed_swiglu``: dropless, every (token, expert) pair sorted; and
``capacity_swiglu``: every expert on a fixed number of its own rows, for small serving steps).

    x [P, D] rows sorted by expert, group_sizes [E] (sum = P), weights W_gate/W_up [E, D, F],
    W_down [E, F, D]  ->  y [P, D], row i computed with the weights of its expert.

The grouped matmul has two backends (``GROUPED``, chosen by ``runtime.grouped_matmul``).
``ragged_dot`` is ``jax.lax.ragged_dot``: a real grouped matmul on TPU (and GPU). On CPU
(jax 0.10) it computes every row against every expert and is ~25x slower than the FLOPs
warrant, so ``blocked`` scatters each expert's rows into whole blocks of ``block`` rows
and loops over the blocks, one expert per block: the same result with at most one
partially-filled block per expert of extra work. The loop runs only over the blocks in use
(a run-time trip count; the static layout reserves E spare ones) and has a hand-written
backward that accumulates each expert's weight gradient in place. ``auto`` picks
``blocked`` on CPU and ``ragged_dot`` elsewhere.

Rows past ``sum(group_sizes)`` belong to no group: ``ragged_dot`` gives them zeros, and
``blocked`` gives them no block (they are dropped on the way in and read back as zeros), so
they cost no matmul. ``routed_swiglu`` relies on this to compute only the (token, expert)
pairs of a slice of the experts: the expert-parallel island (``moela.parallel.experts``) gives each
device all the pairs and the device's own experts, and the pairs of other devices' experts
sort to the tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moela.kernels.registry import ANY, Backends


def ragged_swiglu(x_pd, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, block: int):
    del block
    gate = jax.lax.ragged_dot(x_pd, w_gate_edf, group_sizes_e)
    up = jax.lax.ragged_dot(x_pd, w_up_edf, group_sizes_e)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_efd, group_sizes_e)


def block_layout(group_sizes_e, rows: int, block: int):
    """Where each sorted row goes when every expert's group starts on a block boundary.

    Returns (dest [P] padded row index, block_expert [NB] expert of each block, NB).
    NB = ceil(P / block) + E bounds the blocks any group sizes can need. Rows past
    ``sum(group_sizes)`` (in no group) get dest = NB * block: out of bounds, no block.
    """
    e = group_sizes_e.shape[0]
    num_blocks = -(-rows // block) + e
    padded_e = (group_sizes_e + block - 1) // block * block
    padded_end_e = jnp.cumsum(padded_e)
    start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
    expert_p = jnp.repeat(jnp.arange(e), group_sizes_e, total_repeat_length=rows)
    dest_p = (padded_end_e - padded_e)[expert_p] + jnp.arange(rows) - start_e[expert_p]
    dest_p = jnp.where(jnp.arange(rows) < jnp.sum(group_sizes_e), dest_p, num_blocks * block)
    block_expert = jnp.searchsorted(padded_end_e, jnp.arange(num_blocks) * block, side="right")
    return dest_p, jnp.minimum(block_expert, e - 1), num_blocks


def blocked_swiglu(x_pd, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, block: int):
    rows, d = x_pd.shape
    dest_p, block_expert, num_blocks = block_layout(group_sizes_e, rows, block)
    used = jnp.sum((group_sizes_e + block - 1) // block).astype(jnp.int32)  # the rest hold no rows
    x_blocks = jnp.zeros((num_blocks * block, d), x_pd.dtype).at[dest_p].set(x_pd, mode="drop")
    y_blocks = _swiglu_blocks(
        x_blocks.reshape(num_blocks, block, d), block_expert, used, w_gate_edf, w_up_edf, w_down_efd
    )
    return y_blocks.reshape(num_blocks * block, -1).at[dest_p].get(mode="fill", fill_value=0)


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _put(buffer, i, value):
    return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), i, 0)


@jax.custom_vjp
def _swiglu_blocks(x_nbd, expert_n, used, w_gate_edf, w_up_edf, w_down_efd):
    return _swiglu_blocks_fwd(x_nbd, expert_n, used, w_gate_edf, w_up_edf, w_down_efd)[0]


def _swiglu_blocks_fwd(x_nbd, expert_n, used, w_gate_edf, w_up_edf, w_down_efd):
    """Blocks [0, used) through their expert's SwiGLU; the spare blocks the static layout
    reserves are never computed (a loop with a run-time trip count: no autodiff through it)."""
    n, b, _ = x_nbd.shape
    f = w_gate_edf.shape[-1]

    def one_block(i, carry):
        y, g, u = carry
        x_bd, e = x_nbd[i], expert_n[i]
        g_bf, u_bf = _mm(x_bd, w_gate_edf[e]).astype(x_bd.dtype), _mm(x_bd, w_up_edf[e]).astype(x_bd.dtype)
        y_bd = _mm(jax.nn.silu(g_bf) * u_bf, w_down_efd[e])
        return _put(y, i, y_bd), _put(g, i, g_bf), _put(u, i, u_bf)

    empty = jnp.zeros_like(x_nbd, shape=(n, b, f))  # *_like: inside shard_map, as varying as x
    y, g, u = jax.lax.fori_loop(0, used, one_block, (jnp.zeros_like(x_nbd), empty, empty))
    return y, (x_nbd, expert_n, used, g, u, w_gate_edf, w_up_edf, w_down_efd)


def _swiglu_blocks_bwd(residuals, dy_nbd):
    """Per used block, the SwiGLU backward; each expert's weight gradient is accumulated in
    place in the loop carry (autodiff of a scan would stack one [D, F] gradient per block,
    then scatter-add them)."""
    x_nbd, expert_n, used, g_nbf, u_nbf, w_gate_edf, w_up_edf, w_down_efd = residuals
    dy_nbd = dy_nbd.astype(x_nbd.dtype)

    def one_block(i, carry):
        dwg, dwu, dwd, dx = carry
        x_bd, e, dy_bd = x_nbd[i], expert_n[i], dy_nbd[i]
        g32, u32 = g_nbf[i].astype(jnp.float32), u_nbf[i].astype(jnp.float32)
        sig = jax.nn.sigmoid(g32)
        silu = g32 * sig
        dh = _mm(dy_bd, w_down_efd[e].T)
        du = (dh * silu).astype(x_bd.dtype)
        dg = (dh * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(x_bd.dtype)
        dwd = dwd.at[e].add(_mm((silu * u32).astype(x_bd.dtype).T, dy_bd))
        dwg = dwg.at[e].add(_mm(x_bd.T, dg))
        dwu = dwu.at[e].add(_mm(x_bd.T, du))
        return dwg, dwu, dwd, _put(dx, i, _mm(dg, w_gate_edf[e].T) + _mm(du, w_up_edf[e].T))

    zeros = tuple(jnp.zeros_like(w, jnp.float32) for w in (w_gate_edf, w_up_edf, w_down_efd))
    dwg, dwu, dwd, dx = jax.lax.fori_loop(0, used, one_block, zeros + (jnp.zeros_like(x_nbd),))
    return dx, None, None, dwg.astype(w_gate_edf.dtype), dwu.astype(w_up_edf.dtype), dwd.astype(w_down_efd.dtype)


_swiglu_blocks.defvjp(_swiglu_blocks_fwd, _swiglu_blocks_bwd)


GROUPED = Backends(
    "grouped matmul",
    {"ragged_dot": ragged_swiglu, "blocked": blocked_swiglu},
    auto={"cpu": "blocked", ANY: "ragged_dot"},
)


def routed_swiglu(
    x_md,
    weights_mk,
    ids_mk,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    *,
    backend: str = "auto",
    block: int = 128,
    first_expert=0,
):
    """y[m] = sum_k weights[m, k] * SwiGLU_{ids[m, k]}(x[m]) over the experts held here.

    x [M, D], weights/ids [M, k] (ids global, in [0, E_total); any leading token dims work the
    same, e.g. [B, T, D] and [B, T, k]), W_gate/W_up [E, D, F] and
    W_down [E, F, D] the experts ``first_expert .. first_expert + E - 1`` (``first_expert`` may
    be traced). The M·k (token, expert) pairs are sorted by expert, those of other experts
    last, where the grouped SwiGLU (``backend``) computes nothing for them; each result row is
    scaled by its routing weight and scatter-added back to its token. Returns y [M, D] in
    x's dtype (rows routed only elsewhere are zero); with F split, a partial sum over F.
    """
    lead = x_md.shape[:-1]
    x_md, weights_mk, ids_mk = (
        x_md.reshape(-1, x_md.shape[-1]),
        weights_mk.reshape(-1, ids_mk.shape[-1]),
        ids_mk.reshape(-1, ids_mk.shape[-1]),
    )
    m, k = ids_mk.shape
    e = w_gate_edf.shape[0]
    local_p = ids_mk.reshape(-1) - first_expert
    mine_p = (local_p >= 0) & (local_p < e)
    key_p = jnp.where(mine_p, local_p, e)  # other experts' pairs sort past every group
    order_p = jnp.argsort(key_p, stable=True)
    rows_p = order_p // k  # token of each sorted pair
    group_sizes_e = jnp.bincount(key_p, length=e).astype(jnp.int32)  # key e is not counted
    x_pd = jnp.take(x_md, rows_p, axis=0)
    y_pd = GROUPED[backend](x_pd, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, block)
    weight_p = jnp.take(jnp.where(mine_p, weights_mk.reshape(-1), 0.0), order_p)
    y_pd = y_pd * weight_p[:, None].astype(y_pd.dtype)
    y_md = jnp.zeros((m, y_pd.shape[-1]), x_md.dtype).at[rows_p].add(y_pd.astype(x_md.dtype))
    return y_md.reshape(lead + y_md.shape[-1:])


def capacities(tokens: int, experts_per_token: int, num_experts: int) -> tuple[int, ...]:
    """Rows per expert ``capacity_swiglu`` compiles for a step of ``tokens`` tokens: powers of two
    from the mean load T·k/E (at least 4; the busiest expert never has fewer) up to ``tokens``
    (an expert sees each token at most once, so ``tokens`` never drops)."""
    mean = -(-tokens * experts_per_token // num_experts)
    caps, c = [], max(4, 1 << (mean - 1).bit_length())
    while c < tokens:
        caps.append(c)
        c *= 2
    return tuple(caps) + (tokens,)


def capacity_swiglu(x_td, weights_tk, ids_tk, w_gate_edf, w_up_edf, w_down_efd):
    """y[t] = sum_k weights[t, k] * SwiGLU_{ids[t, k]}(x[t]), every expert run on a fixed number C
    of rows, its own tokens: three batched matmuls over all experts, each on C rows (its tokens,
    then zero rows) instead of all T. C is the smallest of ``capacities(T, k, E)`` that holds the
    busiest expert, picked at run time (``lax.switch``), so nothing is ever dropped; each expert's
    weights are read once, in place. ids lie in [0, E]; pairs with id E (padding) go nowhere.

    For steps of few tokens that touch most experts (serving decode batches): the grouped matmul
    would pay a mostly empty block per expert, and running every expert on every token wastes
    FLOPs (bench preset, batch 32: 6.1 ms a layer that way, 1.7 ms on their own rows)."""
    t, k = ids_tk.shape
    e = w_gate_edf.shape[0]
    ids_p = ids_tk.reshape(-1)
    order_p = jnp.argsort(ids_p, stable=True)
    sorted_p = ids_p[order_p]
    counts_e = jnp.bincount(ids_p, length=e + 1)[:e]
    starts_e = jnp.cumsum(counts_e) - counts_e
    rank_p = jnp.arange(t * k, dtype=jnp.int32) - starts_e[jnp.minimum(sorted_p, e - 1)]
    caps = capacities(t, k, e)

    def run(cap):
        def branch(x_td):
            slot_p = jnp.where(sorted_p < e, sorted_p * cap + rank_p, e * cap)  # sorted order; e·cap: none
            token_c = jnp.full((e * cap,), t, jnp.int32).at[slot_p].set(order_p // k, mode="drop")
            x_ecd = jnp.concatenate([x_td, jnp.zeros_like(x_td[:1])])[token_c].reshape(e, cap, -1)
            cd = x_td.dtype
            gate = jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf.astype(cd))
            up = jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf.astype(cd))
            y_cd = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down_efd.astype(cd)).reshape(e * cap, -1)
            pair_slot = jnp.zeros((t * k,), jnp.int32).at[order_p].set(slot_p)  # back to (token, k) order
            y_tkd = y_cd.at[pair_slot].get(mode="fill", fill_value=0).reshape(t, k, -1)
            return jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(cd))

        return branch

    busiest = jnp.max(counts_e)
    index = jnp.sum(busiest > jnp.asarray(caps[:-1], jnp.int32))
    return jax.lax.switch(index, [run(c) for c in caps], x_td)
