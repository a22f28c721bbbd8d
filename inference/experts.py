"""The MoE feed-forward of a serving step: the layer's router and shared experts, and the routed
experts computed the way a step of T tokens wants them.

* Most experts touched, few pairs per each (``dense_pays``, decided at run time: decode batches
  of 8 to 32 tokens on the ``bench`` preset): every expert runs on every token, three batched matmuls over all
  experts, and the routing weights (zero off each token's top-k) combine them. The step reads each
  expert's weights once, in place; the extra FLOPs are cheap next to that read at these sizes.
  (A loop over the used experts paid a copy and a small matmul per expert: 16 of a 34 ms
  batch-8 step.)
* Otherwise (prefill chunks): dropless grouped matmul, pairs sorted by expert and padded to
  blocks of about T·k/E rows (``expert_block_rows``), one loop iteration per used block. Padding
  tokens route to no expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.experts import block_layout

DENSE_EXPERT_PAIRS = 4


def expert_block_rows(tokens: int, moe) -> int:
    """Rows per block of the grouped matmul for a step of ``tokens`` tokens: about one block per
    expert's expected share (T·k/E rows), a power of two in [8, 128]. Training's 128 would make a
    64-token step compute 17 blocks of 128 rows per layer, mostly padding."""
    share = max(tokens * moe.experts_per_token // moe.num_experts, 1)
    return min(128, max(8, 1 << (share - 1).bit_length()))


def dense_pays(real_tokens, moe):
    """Should the step run every expert on every token? When its real tokens are expected to
    touch at least half the experts (uniform routing: E·(1 - (1 - k/E)^n)) and bring at most
    ``DENSE_EXPERT_PAIRS`` pairs per expert. Decided at run time from the count of real tokens
    (padding does not count), so one compiled shape serves batch 1 (grouped: 2 of 16 experts
    read on the bench preset, 14 ms a step against 30 dense) and batch 8 (dense)."""
    e, k = moe.num_experts, moe.experts_per_token
    touched = e * (1 - (1 - k / e) ** real_tokens.astype(jnp.float32))
    return (touched >= e / 2) & (real_tokens * k <= DENSE_EXPERT_PAIRS * e)


def dense_experts(x_td, weights_tk, ids_tk, real_t, w_gate_edf, w_up_edf, w_down_efd):
    """Every expert on every token, combined with the routing weights."""
    e, cd = w_gate_edf.shape[0], x_td.dtype
    combine_te = jnp.sum(jax.nn.one_hot(ids_tk, e, dtype=jnp.float32) * weights_tk[..., None], axis=1)
    combine_te = jnp.where(real_t[:, None], combine_te, 0.0)
    # batched over e: contracting [T, D] with [E, D, F] directly made XLA lay the weights out as
    # [D, E·F] first, a copy of every expert each step (it doubled the batch-8 step)
    x_etd = jnp.broadcast_to(x_td, (e,) + x_td.shape)
    gate = jnp.einsum("etd,edf->etf", x_etd, w_gate_edf.astype(cd))
    up = jnp.einsum("etd,edf->etf", x_etd, w_up_edf.astype(cd))
    y_etd = jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * up, w_down_efd.astype(cd))
    return jnp.einsum("etd,te->td", y_etd, combine_te.astype(cd))


def grouped_experts(x_td, weights_tk, ids_tk, real_t, w_gate_edf, w_up_edf, w_down_efd, block: int):
    """Dropless grouped SwiGLU over the used blocks only (padding tokens' pairs go to no expert)."""
    t, k = ids_tk.shape
    e, d = w_gate_edf.shape[0], x_td.shape[-1]
    key_p = jnp.where(real_t[:, None], ids_tk, e).reshape(-1)  # padding sorts past every group
    order_p = jnp.argsort(key_p, stable=True)
    group_sizes_e = jnp.bincount(key_p, length=e).astype(jnp.int32)
    x_pd = jnp.take(x_td, order_p // k, axis=0)
    dest_p, block_expert_n, num_blocks = block_layout(group_sizes_e, t * k, block)
    used = jnp.sum((group_sizes_e + block - 1) // block).astype(jnp.int32)
    x_nbd = jnp.zeros((num_blocks * block, d), x_td.dtype).at[dest_p].set(x_pd, mode="drop")
    x_nbd = x_nbd.reshape(num_blocks, block, d)

    def one_block(i, y_nbd):
        x_bd, expert = x_nbd[i], block_expert_n[i]
        gate = jnp.matmul(x_bd, w_gate_edf[expert].astype(x_bd.dtype))
        up = jnp.matmul(x_bd, w_up_edf[expert].astype(x_bd.dtype))
        y_bd = jnp.matmul(jax.nn.silu(gate) * up, w_down_efd[expert].astype(x_bd.dtype))
        return jax.lax.dynamic_update_index_in_dim(y_nbd, y_bd, i, 0)

    y_nbd = jax.lax.fori_loop(0, used, one_block, jnp.zeros_like(x_nbd))
    y_pd = y_nbd.reshape(num_blocks * block, d).at[dest_p].get(mode="fill", fill_value=0)
    weight_p = jnp.take(weights_tk.reshape(-1), order_p).astype(y_pd.dtype)
    return jnp.zeros_like(x_td).at[order_p // k].add(y_pd * weight_p[:, None])


def moe_ffn(moe, h_td, real_t):
    """y [T, D] of one MoE layer (``model.moe.MoE``) for the step's tokens h [T, D]."""
    cfg, experts = moe.cfg, moe.experts
    weights_tk, ids_tk, _ = moe.router(h_td)
    cd = experts.compute_dtype
    ws = tuple(w[...].astype(cd) for w in (experts.w_gate, experts.w_up, experts.w_down))
    t, x_td = h_td.shape[0], h_td.astype(cd)
    args = (x_td, weights_tk, ids_tk, real_t, *ws)
    grouped = lambda a: grouped_experts(*a, expert_block_rows(t, cfg))  # noqa: E731
    if t * cfg.experts_per_token <= DENSE_EXPERT_PAIRS * cfg.num_experts:  # dense is possible
        y_td = jax.lax.cond(dense_pays(jnp.sum(real_t), cfg), lambda a: dense_experts(*a), grouped, args)
    else:
        y_td = grouped(args)
    if moe.shared is not None:
        y_td = y_td + moe.shared(h_td).astype(y_td.dtype)
    return y_td
