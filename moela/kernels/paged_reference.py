"""Ragged paged attention, defined: the row layout of the cache, the packed-batch metadata, the
reference every backend is tested against, and the row writer.

See ``moela.kernels.paged`` for the layout of the arguments; this module holds what the backends
share (``RowFormat``, ``validate``, ``token_layout``) and the definition itself (``reference``:
each token gathers its sequence's whole page table, in float32).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from moela.kernels.common import NEG_INF


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """Where keys and values sit in a cache row: keys row[:k_dim], values row[v_offset:v_offset+v_dim]."""

    k_dim: int
    v_offset: int
    v_dim: int

    @classmethod
    def mla(cls, kv_lora_rank: int, rope_dim: int) -> "RowFormat":
        return cls(kv_lora_rank + rope_dim, 0, kv_lora_rank)

    @classmethod
    def gqa(cls, head_dim: int) -> "RowFormat":
        return cls(head_dim, head_dim, head_dim)

    @property
    def width(self) -> int:
        return max(self.k_dim, self.v_offset + self.v_dim)


def validate(q_thk, pool_lnpgw, kv_lens_s, page_table_sm, cu_q_lens_s1, fmt: RowFormat) -> None:
    """One clear error for inputs no backend can take."""
    if q_thk.ndim != 3 or pool_lnpgw.ndim != 5:
        raise ValueError(f"expected q [T, H, K] and pool [L, N, P, G, W]; got {q_thk.shape}, {pool_lnpgw.shape}")
    t, h, k = q_thk.shape
    g, w = pool_lnpgw.shape[3:]
    if k != fmt.k_dim or w < fmt.width:
        raise ValueError(
            f"query dim {k} / row width {w} do not fit the row format {fmt} (needs K = {fmt.k_dim}, W >= {fmt.width})"
        )
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
    s = page_table_sm.shape[0]
    if page_table_sm.ndim != 2 or kv_lens_s.shape != (s,) or cu_q_lens_s1.shape != (s + 1,):
        raise ValueError(
            f"page_table [S, M], kv_lens [S], cu_q_lens [S + 1] disagree: {page_table_sm.shape}, "
            f"{kv_lens_s.shape}, {cu_q_lens_s1.shape}"
        )


def token_layout(t: int, kv_lens_s, cu_q_lens_s1, num_seqs):
    """Per packed token: (sequence index [T], position in its sequence [T], is-real-token [T])."""
    s = kv_lens_s.shape[0]
    tok = jnp.arange(t, dtype=jnp.int32)
    seq_t = jnp.minimum(jnp.searchsorted(cu_q_lens_s1[1:], tok, side="right").astype(jnp.int32), s - 1)
    real_t = tok < cu_q_lens_s1[jnp.minimum(num_seqs, s)]
    q_len_s = cu_q_lens_s1[1:] - cu_q_lens_s1[:-1]
    pos_t = kv_lens_s[seq_t] - q_len_s[seq_t] + (tok - cu_q_lens_s1[seq_t])
    return seq_t, pos_t, real_t


def reference(
    q_thk, pool_lnpgw, kv_lens_s, page_table_sm, cu_q_lens_s1, num_seqs, layer, *, scale: float, fmt: RowFormat
):
    """The definition, in float32: each token gathers its sequence's pages and attends causally.

    Rows past a sequence's length (and pages past its last) are never used: they are masked out
    of both the scores and the values, so whatever they hold (NaN included) cannot leak."""
    t, h, k = q_thk.shape
    _, n, p, g, w = pool_lnpgw.shape
    m = page_table_sm.shape[1]
    seq_t, pos_t, real_t = token_layout(t, kv_lens_s, cu_q_lens_s1, num_seqs)
    pages_tm = jnp.clip(page_table_sm[seq_t], 0, n - 1)
    rows_tcgw = pool_lnpgw[layer, pages_tm].reshape(t, m * p, g, w)
    key_c = jnp.arange(m * p, dtype=jnp.int32)
    visible_tc = (key_c[None] <= pos_t[:, None]) & (key_c[None] < kv_lens_s[seq_t][:, None]) & real_t[:, None]
    keys = jnp.where(visible_tc[:, :, None, None], rows_tcgw[..., : fmt.k_dim], 0).astype(jnp.float32)
    values = rows_tcgw[..., fmt.v_offset : fmt.v_offset + fmt.v_dim]
    values = jnp.where(visible_tc[:, :, None, None], values, 0).astype(jnp.float32)
    q_tgrk = q_thk.reshape(t, g, h // g, k).astype(jnp.float32)
    s_tgrc = jnp.einsum("tgrk,tcgk->tgrc", q_tgrk, keys, precision="highest") * scale
    mask = visible_tc[:, None, None, :]
    s_tgrc = jnp.where(mask, s_tgrc, NEG_INF)
    p_tgrc = jnp.where(mask, jnp.exp(s_tgrc - jnp.max(s_tgrc, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p_tgrc, axis=-1, keepdims=True)
    p_tgrc = p_tgrc / jnp.where(denom == 0, 1.0, denom)
    out_tgrv = jnp.einsum("tgrc,tcgv->tgrv", p_tgrc, values, precision="highest")
    return out_tgrv.reshape(t, h, fmt.v_dim).astype(q_thk.dtype)


def write_rows(pool_lnpgw, rows_tgw, slots_t, layer):
    """pool with ``rows`` [T, G, W] written at flat slots (page · P + offset) of ``layer``; slots < 0 are dropped."""
    _, n, p, g, w = pool_lnpgw.shape
    if rows_tgw.shape[1:] != (g, w):
        raise ValueError(f"rows {rows_tgw.shape} do not fit pool rows [G={g}, W={w}]")
    valid = (slots_t >= 0) & (slots_t < n * p)
    page = jnp.where(valid, slots_t // p, n)  # out of range: dropped by the scatter
    offset = jnp.where(valid, slots_t % p, 0)
    return pool_lnpgw.at[layer, page, offset].set(rows_tgw.astype(pool_lnpgw.dtype), mode="drop")
