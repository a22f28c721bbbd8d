"""Block schedules shared by the flash kernels: which (q block, kv block) pairs can hold a
visible (query, key) pair, from the causal diagonal and the segment ids of packed rows.

A pair of blocks is active when the causal mask leaves something visible and the segment-id
ranges of the two blocks meet (ids are equal somewhere only if [lo, hi] ranges overlap; for
packed rows, whose ids never decrease, that is also sufficient up to the element mask). Each
kernel visits, for every block of its parallel axis, the span [first, last] of active blocks
on its sequential axis; blocks inside the span that are not active are skipped or masked.
"""

from __future__ import annotations

import jax.numpy as jnp


def segment_ranges(ids_bn, n_blocks: int, block: int):
    """(lo, hi) [B, n_blocks]: the smallest and largest id in each block of ``ids_bn`` [B, N]
    (padded with the last id, so padding never widens a range); zeros when ``ids_bn`` is None."""
    if ids_bn is None:
        return jnp.zeros((1, n_blocks), jnp.int32), jnp.zeros((1, n_blocks), jnp.int32)
    b = ids_bn.shape[0]
    ids = jnp.pad(ids_bn.astype(jnp.int32), ((0, 0), (0, n_blocks * block - ids_bn.shape[1])), mode="edge")
    ids = ids.reshape(b, n_blocks, block)
    return ids.min(-1), ids.max(-1)


def active_pairs(q_lo, q_hi, kv_lo, kv_hi, visible_ij):
    """[B, nq, nk] bool: causal visibility ([nq, nk] or a scalar) and meeting segment ranges."""
    meet = (q_lo[:, :, None] <= kv_hi[:, None, :]) & (kv_lo[:, None, :] <= q_hi[:, :, None])
    return meet & visible_ij


def span(active, axis: int):
    """(first, last, any) along ``axis`` of ``active``: the first and last active index (int32;
    meaningless where ``any`` is False, which the caller must handle)."""
    n = active.shape[axis]
    first = jnp.argmax(active, axis=axis)
    last = n - 1 - jnp.argmax(jnp.flip(active, axis=axis), axis=axis)
    return first.astype(jnp.int32), last.astype(jnp.int32), jnp.any(active, axis=axis)
