"""Grouped SwiGLU over rows sorted by expert: the compute of dropless MoE, two ways.

    x [P, D] rows sorted by expert, group_sizes [E] (sum = P), weights W_gate/W_up [E, D, F],
    W_down [E, F, D]  ->  y [P, D], row i computed with the weights of its expert.

``ragged_dot`` is ``jax.lax.ragged_dot``: a real grouped matmul on TPU (and GPU). On CPU
(jax 0.10) it computes every row against every expert and is ~25x slower than the FLOPs
warrant, so ``blocked`` scatters each expert's rows into whole blocks of ``block`` rows
and scans over the blocks, one expert per block: the same result with at most one
partially-filled block per expert of extra work. ``auto`` picks ``blocked`` on CPU.
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
    NB = ceil(P / block) + E bounds the blocks any group sizes can need.
    """
    e = group_sizes_e.shape[0]
    num_blocks = -(-rows // block) + e
    padded_e = (group_sizes_e + block - 1) // block * block
    padded_end_e = jnp.cumsum(padded_e)
    start_e = jnp.cumsum(group_sizes_e) - group_sizes_e
    expert_p = jnp.repeat(jnp.arange(e), group_sizes_e, total_repeat_length=rows)
    dest_p = (padded_end_e - padded_e)[expert_p] + jnp.arange(rows) - start_e[expert_p]
    block_expert = jnp.searchsorted(padded_end_e, jnp.arange(num_blocks) * block, side="right")
    return dest_p, jnp.minimum(block_expert, e - 1), num_blocks


def blocked_swiglu(x_pd, w_gate_edf, w_up_edf, w_down_efd, group_sizes_e, block: int):
    rows, d = x_pd.shape
    dest_p, block_expert, num_blocks = block_layout(group_sizes_e, rows, block)
    x_blocks = jnp.zeros((num_blocks * block, d), x_pd.dtype).at[dest_p].set(x_pd).reshape(num_blocks, block, d)

    def one_block(_, inputs):
        x_bd, expert = inputs
        h_bf = jax.nn.silu(x_bd @ w_gate_edf[expert]) * (x_bd @ w_up_edf[expert])
        return None, h_bf @ w_down_efd[expert]

    # Empty trailing blocks hold zero rows, and SwiGLU(0) = 0: they cost FLOPs, not correctness.
    _, y_blocks = jax.lax.scan(one_block, None, (x_blocks, block_expert))
    return y_blocks.reshape(num_blocks * block, -1)[dest_p]


GROUPED_SWIGLU = {"ragged_dot": ragged_swiglu, "blocked": blocked_swiglu}


def resolve(impl: str) -> str:
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl
