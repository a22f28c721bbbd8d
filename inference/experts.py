"""The MoE feed-forward of a serving step: the layer's router and shared experts, and the routed
experts computed the way a step of T tokens wants them.

* Most experts touched, few pairs per each (``dense_pays``, decided at run time: decode batches
  of 8 to 32 tokens on the ``bench`` preset): every expert runs on every token, three batched matmuls over all
  experts, and the routing weights (zero off each token's top-k) combine them. The step reads each
  expert's weights once, in place; the extra FLOPs are cheap next to that read at these sizes.
  (A loop over the used experts paid a copy and a small matmul per expert: 16 of a 34 ms
  batch-8 step.)
* Otherwise (prefill chunks): the model's dropless grouped matmul (``moe.impl``: ``ragged_dot`` on
  TPU/GPU, used blocks of about T·k/E rows on CPU, ``expert_block_rows``); padding tokens route
  to no expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.experts import routed_swiglu

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


def grouped_experts(x_td, weights_tk, ids_tk, real_t, w_gate_edf, w_up_edf, w_down_efd, *, impl: str, block: int):
    """Dropless grouped SwiGLU (``model.experts.routed_swiglu``) over real tokens only: padding
    tokens' pairs get the out-of-range expert id E, which sorts past every group and is never
    computed."""
    ids_tk = jnp.where(real_t[:, None], ids_tk, w_gate_edf.shape[0])
    return routed_swiglu(x_td, weights_tk, ids_tk, w_gate_edf, w_up_edf, w_down_efd, impl=impl, block=block)


def moe_ffn(moe, h_td, real_t):
    """y [T, D] of one MoE layer (``model.moe.MoE``) for the step's tokens h [T, D]."""
    cfg, experts = moe.cfg, moe.experts
    weights_tk, ids_tk, _ = moe.router(h_td)
    cd = experts.compute_dtype
    ws = tuple(w[...].astype(cd) for w in (experts.w_gate, experts.w_up, experts.w_down))
    t, x_td = h_td.shape[0], h_td.astype(cd)
    args = (x_td, weights_tk, ids_tk, real_t, *ws)
    grouped = lambda a: grouped_experts(*a, impl=experts.impl, block=expert_block_rows(t, cfg))  # noqa: E731
    if t * cfg.experts_per_token <= DENSE_EXPERT_PAIRS * cfg.num_experts:  # dense is possible
        y_td = jax.lax.cond(dense_pays(jnp.sum(real_t), cfg), lambda a: dense_experts(*a), grouped, args)
    else:
        y_td = grouped(args)
    if moe.shared is not None:
        y_td = y_td + moe.shared(h_td).astype(y_td.dtype)
    return y_td
