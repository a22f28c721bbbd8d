"""Block schedules shared by the flash kernels: which (q block, kv block) pairs can hold a
visible (query, key) pair, from the causal diagonal and the segment ids of packed rows.

A pair of blocks is active when the causal mask leaves something visible and the segment-id
ranges of the two blocks meet (ids are equal somewhere only if [lo, hi] ranges overlap; for
packed rows, whose ids never decrease, that is also sufficient up to the element mask). Each
kernel visits, for every block of its parallel axis, the span [first, last] of active blocks
on its sequential axis; blocks inside the span that are not active are skipped or masked.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one kernel call: real lengths, block sizes, mask flags, softmax scale.
    Queries are the last ``t`` of ``s`` positions: query row r sits at position r + offset."""

    t: int
    s: int
    bq: int
    bk: int
    causal: bool
    segmented: bool
    scale: float

    @property
    def offset(self) -> int:
        return self.s - self.t

    @property
    def nq(self) -> int:
        return -(-self.t // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.s // self.bk)

    def visible(self, i, j):
        """Does any query of q block i see any key of kv block j (causal)?"""
        return j * self.bk <= (i + 1) * self.bq - 1 + self.offset if self.causal else True


def validate(q, k, v, q_seg, kv_seg):
    """One clear error for inputs no kernel can take."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B,T,H,K], k [B,S,G,K], v [B,S,G,V]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} disagree on batch, kv length, kv heads or Dqk")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")


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
