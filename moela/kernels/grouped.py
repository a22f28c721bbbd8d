"""Grouped SwiGLU over rows sorted by expert: the compute of dropless MoE, two ways.

    x [P, D] rows sorted by expert, group_sizes [E] (sum = P), weights W_gate/W_up [E, D, F],
    W_down [E, F, D]  ->  y [P, D], row i computed with the weights of its expert.

``ragged_dot`` is ``jax.lax.ragged_dot``: a real grouped matmul on TPU (and GPU). On CPU
(jax 0.10) it computes every row against every expert and is ~25x slower than the FLOPs
warrant, so ``blocked`` scatters each expert's rows into whole blocks of ``block`` rows
and loops over the blocks, one expert per block: the same result with at most one
partially-filled block per expert of extra work. The loop runs only over the blocks in use
(a run-time trip count; the static layout reserves E spare ones) and has a hand-written
backward that accumulates each expert's weight gradient in place. ``auto`` picks
``blocked`` on CPU.

Rows past ``sum(group_sizes)`` belong to no group: ``ragged_dot`` gives them zeros, and
``blocked`` gives them no block (they are dropped on the way in and read back as zeros), so
they cost no matmul. ``routed_swiglu`` relies on this to compute only the (token, expert)
pairs of a slice of the experts: the expert-parallel island (``parallel.experts``) gives each
device all the pairs and the device's own experts, and the pairs of other devices' experts
sort to the tail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    y_blocks = _swiglu_blocks(x_blocks.reshape(num_blocks, block, d), block_expert, used, w_gate_edf, w_up_edf,
                              w_down_efd)
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


GROUPED_SWIGLU = {"ragged_dot": ragged_swiglu, "blocked": blocked_swiglu}


def resolve(impl: str) -> str:
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def routed_swiglu(x_md, weights_mk, ids_mk, w_gate_edf, w_up_edf, w_down_efd, *, impl: str = "auto",
                  block: int = 128, first_expert=0):
    """y[m] = sum_k weights[m, k] * SwiGLU_{ids[m, k]}(x[m]) over the experts held here.

    x [M, D], weights/ids [M, k] (ids global, in [0, E_total); any leading token dims work the
    same, e.g. [B, T, D] and [B, T, k]), W_gate/W_up [E, D, F] and
    W_down [E, F, D] the experts ``first_expert .. first_expert + E - 1`` (``first_expert`` may
    be traced). The M·k (token, expert) pairs are sorted by expert, those of other experts
    last, where the grouped SwiGLU (``impl``) computes nothing for them; each result row is
    scaled by its routing weight and scatter-added back to its token. Returns y [M, D] in
    x's dtype (rows routed only elsewhere are zero); with F split, a partial sum over F.
    """
    lead = x_md.shape[:-1]
    x_md, weights_mk, ids_mk = x_md.reshape(-1, x_md.shape[-1]), weights_mk.reshape(-1, ids_mk.shape[-1]), \
        ids_mk.reshape(-1, ids_mk.shape[-1])
    m, k = ids_mk.shape
    e = w_gate_edf.shape[0]
    local_p = ids_mk.reshape(-1) - first_expert
    mine_p = (local_p >= 0) & (local_p < e)
    key_p = jnp.where(mine_p, local_p, e)  # other experts' pairs sort past every group
    order_p = jnp.argsort(key_p, stable=True)
    rows_p = order_p // k  # token of each sorted pair
    group_sizes_e = jnp.bincount(key_p, length=e).astype(jnp.int32)  # key e is not counted
    x_pd = jnp.take(x_md, rows_p, axis=0)
    y_pd = GROUPED_SWIGLU[resolve(impl)](x_pd, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, block)
    weight_p = jnp.take(jnp.where(mine_p, weights_mk.reshape(-1), 0.0), order_p)
    y_pd = y_pd * weight_p[:, None].astype(y_pd.dtype)
    y_md = jnp.zeros((m, y_pd.shape[-1]), x_md.dtype).at[rows_p].add(y_pd.astype(x_md.dtype))
    return y_md.reshape(lead + y_md.shape[-1:])
