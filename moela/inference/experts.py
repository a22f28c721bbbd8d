"""The MoE feed-forward of a serving step: the layer's router and shared experts, and the routed
experts computed the way a step of T tokens wants them.

* Most experts touched, few pairs per each (``capacity_pays``, decided at run time: decode batches
  of 8 to 128 tokens on the ``bench`` preset): every expert runs on C rows of its own tokens,
  three batched matmuls over all experts (``capacity_experts``; C the smallest power of two
  that holds the busiest expert, chosen at run time). The step reads each expert's weights
  once, in place. (A loop over the used experts paid a copy and a small matmul per expert: 16
  of a 34 ms batch-8 step; running every expert on every token wasted FLOPs: at batch 32 the
  routed experts took 6.1 ms a layer that way and 1.7 ms on their own rows.)
* Otherwise (prefill chunks): the model's dropless grouped matmul (``moe.impl``: ``ragged_dot`` on
  TPU/GPU, used blocks of about T·k/E rows on CPU, ``expert_block_rows``); padding tokens route
  to no expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moela.model.experts import routed_swiglu

CAPACITY_PAIRS_PER_EXPERT = 16  # above T·k = 16·E the grouped matmul's blocks are full enough


def expert_block_rows(tokens: int, moe) -> int:
    """Rows per block of the grouped matmul for a step of ``tokens`` tokens: about one block per
    expert's expected share (T·k/E rows), a power of two in [8, 128]. Training's 128 would make a
    64-token step compute 17 blocks of 128 rows per layer, mostly padding."""
    share = max(tokens * moe.experts_per_token // moe.num_experts, 1)
    return min(128, max(8, 1 << (share - 1).bit_length()))


def capacity_pays(real_tokens, moe):
    """Should the step run every expert (on its own rows)? When its real tokens are expected to
    touch at least half the experts (uniform routing: E·(1 - (1 - k/E)^n)) and bring at most
    ``CAPACITY_PAIRS_PER_EXPERT`` pairs per expert. Decided at run time from the count of real
    tokens (padding does not count), so one compiled shape serves batch 1 (grouped: 2 of 16
    experts read on the bench preset, 14 ms a step against 30 with every expert) and batch 8."""
    e, k = moe.num_experts, moe.experts_per_token
    touched = e * (1 - (1 - k / e) ** real_tokens.astype(jnp.float32))
    return (touched >= e / 2) & (real_tokens * k <= CAPACITY_PAIRS_PER_EXPERT * e)


def capacities(tokens: int, experts_per_token: int, num_experts: int) -> tuple[int, ...]:
    """Rows per expert the capacity path compiles for a step of ``tokens`` tokens: powers of two
    from the mean load T·k/E (at least 4; the busiest expert never has fewer) up to ``tokens``
    (an expert sees each token at most once, so ``tokens`` never drops)."""
    mean = -(-tokens * experts_per_token // num_experts)
    caps, c = [], max(4, 1 << (mean - 1).bit_length())
    while c < tokens:
        caps.append(c)
        c *= 2
    return tuple(caps) + (tokens,)


def capacity_experts(x_td, weights_tk, ids_tk, real_t, w_gate_edf, w_up_edf, w_down_efd):
    """Every expert on a fixed number C of rows, its own tokens: three batched matmuls over all
    experts, each on C rows (its tokens, then zero rows) instead of all T. C is the smallest of
    ``capacities(T, k, E)`` that holds the busiest expert, picked at run time (``lax.switch``), so
    nothing is ever dropped. Each expert's weights are still read once, in place."""
    t, k = ids_tk.shape
    e = w_gate_edf.shape[0]
    ids_p = jnp.where(real_t[:, None], ids_tk, e).reshape(-1)  # padding pairs: no expert
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
    if t * cfg.experts_per_token <= CAPACITY_PAIRS_PER_EXPERT * cfg.num_experts:  # capacity is possible
        y_td = jax.lax.cond(capacity_pays(jnp.sum(real_t), cfg), lambda a: capacity_experts(*a), grouped, args)
    else:
        y_td = grouped(args)
    if moe.shared is not None:
        y_td = y_td + moe.shared(h_td).astype(y_td.dtype)
    return y_td
