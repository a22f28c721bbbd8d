"""Ragged paged attention for TPU (Pallas Mosaic): packed decode / prefill tokens over a paged cache.

Semantics and layout are those of ``kernels.paged`` (q [T, H, K], pool [L, N, P, G, W], rows
[keys | values] per ``RowFormat``). The wrapper groups each kv head's R = H / G query heads
so every (token, head) pair of a kv head is one row of a 2-D matmul operand::

    q [T, H, K] -> [G, Tp·R, K]  (row = token·R + head within the group)     out: the reverse

Tp rounds T up to the query block of ``q_tokens`` tokens (rows past the real tokens are
padding and return zeros). With G = 1 (MLA) the pool's unit kv-head dim is dropped, so a
page is a plain [P, W] tile array.

Schedule. Grid (Tp / q_tokens,), one step per query block, each a whole attention:

* Scalar-prefetched into SMEM: kv_lens, the flattened page table, cu_q_lens, num_seqs,
  layer, and from the wrapper the first and last sequence overlapping each query block.
* The pool stays in HBM (``pl.ANY``). The kernel walks the (sequence, kv block) steps of its
  query block in one flat loop: for every overlapping sequence, kv blocks of
  ``pages_per_block`` pages up to the last position any of its rows in this query block
  needs. Each page is copied by its own async DMA into one of two VMEM slots; the next step's
  copies (of the same sequence, or the next one's first block) start before the current
  step is waited on and computed, so copies overlap compute across sequence boundaries too.
  Only pages below that bound are ever copied: page-table entries past a sequence's pages
  (which may be out of range) are never read.
* Per step and kv head, scores of all rows of the block against the step's keys in float32,
  masked to rows of the current sequence at key positions <= their own (position = kv_len -
  q_len + index in the sequence); values past the needed length (stale buffer rows, NaN
  tails of last pages) are zeroed, masked scores are replaced with ``where`` so nothing they
  hold can leak. Online softmax: running max / sum (lane-replicated [rows, 128]) and the
  float32 accumulator live in VMEM scratch, divided out once at the end.

Rows of other sequences see an all-masked step and are left unchanged, so a query block may
span many sequences (decode batches) and a sequence many query blocks (long prefill). The
price: each step computes every row of the block, so a block of decode tokens from many
short sequences does q_tokens-fold the useful work; ``q_tokens`` trades that against grid
overhead.

Hardware status (no TPU here): interpreted on CPU, and lowered and verified as a Mosaic
module for ``tpu`` at DeepSeek-V3 MLA and GQA shapes; Mosaic's own compilation is unproven.
MLA pages are whole [P, W] tile rows (plain loads, one DMA per page). For G > 1 a page is
copied whole ([P, G, W], heads second-minor as in the pool) and each kv head is read back
as one sublane of every key's tile (``buf[slot, :, g, :]``), the riskiest op for Mosaic,
above all with 16-bit pools; a heads-major cache layout would avoid it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moela.kernels.common import LANES, NEG_INF, NT_DIMS, SUBLANES, div, lanes, round_up
from moela.kernels.paged_reference import RowFormat


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``q_tokens`` packed query tokens per grid step (a multiple of 8; the block holds
    q_tokens · H / G rows per kv head); ``pages_per_block`` pages copied and processed per kv
    step (8 pages of 16 rows: 128 keys)."""

    q_tokens: int = 32
    pages_per_block: int = 8

    def __post_init__(self):
        if self.q_tokens <= 0 or self.q_tokens % SUBLANES:
            raise ValueError(f"BlockSizes.q_tokens must be a positive multiple of {SUBLANES}, got {self.q_tokens}")
        if self.pages_per_block <= 0:
            raise ValueError(f"BlockSizes.pages_per_block must be positive, got {self.pages_per_block}")


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Static sizes: query block (tokens bq, rows per kv head), kv block (pages, keys), pool."""

    bq: int
    heads_per_kv: int
    kv_heads: int
    seqs: int
    max_pages: int
    num_pages: int
    page_size: int
    pages_per_block: int
    fmt: RowFormat
    scale: float

    @property
    def rows(self) -> int:
        return self.bq * self.heads_per_kv

    @property
    def keys(self) -> int:
        return self.pages_per_block * self.page_size


def _kernel(
    kv_lens_ref,
    pages_ref,
    cu_ref,
    nseq_ref,
    layer_ref,
    first_ref,
    last_ref,  # scalar prefetch (SMEM)
    q_ref,
    pool_ref,
    o_ref,
    buf_ref,
    sem_ref,
    m_ref,
    l_ref,
    acc_ref,
    *,
    d: _Dims,
):
    i = pl.program_id(0)
    fmt, c = d.fmt, d.keys
    num_seqs = jnp.minimum(nseq_ref[0], d.seqs)
    blk_lo = i * d.bq
    blk_hi = jnp.minimum(blk_lo + d.bq, cu_ref[num_seqs])  # real tokens of this block: [blk_lo, blk_hi)
    layer = layer_ref[0]

    def span(s):
        """Sequence s in this block: its tokens [lo, hi), position offset (pos = token + off), keys needed."""
        lo, hi = jnp.maximum(cu_ref[s], blk_lo), jnp.minimum(cu_ref[s + 1], blk_hi)
        off = kv_lens_ref[s] - cu_ref[s + 1]
        end = jnp.where(hi > lo, jnp.maximum(hi + off, 0), 0)
        return lo, hi, off, end

    def dma(s, j, slot, end, start: bool):
        """Start (or wait for) the copies of kv block j of sequence s: its pages below ``end``."""
        n_pages = jnp.minimum(div(end + d.page_size - 1, d.page_size) - j * d.pages_per_block, d.pages_per_block)
        for p in range(d.pages_per_block):

            @pl.when(p < n_pages)
            def _copy():
                entry = jnp.minimum(s * d.max_pages + j * d.pages_per_block + p, d.seqs * d.max_pages - 1)
                page = jnp.clip(pages_ref[entry], 0, d.num_pages - 1)
                rows = buf_ref.at[slot, pl.ds(p * d.page_size, d.page_size)]
                copy = pltpu.make_async_copy(pool_ref.at[layer, page], rows, sem_ref.at[slot])
                if start:
                    copy.start()
                else:
                    copy.wait()

    def compute(lo, hi, off, end, j, slot):
        tok = blk_lo + div(jax.lax.broadcasted_iota(jnp.int32, (d.rows, c), 0), d.heads_per_kv)
        key = j * c + jax.lax.broadcasted_iota(jnp.int32, (d.rows, c), 1)
        visible = (tok >= lo) & (tok < hi) & (key <= tok + off)
        value_ok = j * c + jax.lax.broadcasted_iota(jnp.int32, (c, fmt.v_dim), 0) < end
        for g in range(d.kv_heads):
            head = () if d.kv_heads == 1 else (g,)  # GQA: one sublane of each key's [G, W] tile
            k_ck = buf_ref[(slot, slice(None), *head, slice(0, fmt.k_dim))]
            v_cv = buf_ref[(slot, slice(None), *head, slice(fmt.v_offset, fmt.v_offset + fmt.v_dim))]
            v_cv = jnp.where(value_ok, v_cv, 0)
            q_rk = q_ref[g]
            s_rc = jax.lax.dot_general(q_rk, k_ck.astype(q_rk.dtype), NT_DIMS, preferred_element_type=jnp.float32)
            s_rc = jnp.where(visible, s_rc * d.scale, NEG_INF)
            m_prev, l_prev = m_ref[g], l_ref[g]
            m_next = jnp.maximum(m_prev, jnp.max(s_rc, axis=1)[:, None])  # [rows, 128]
            p_rc = jnp.where(visible, jnp.exp(s_rc - lanes(m_next, c)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_ref[g] = alpha * l_prev + jnp.sum(p_rc, axis=1)[:, None]
            m_ref[g] = m_next
            pv = jnp.dot(p_rc.astype(v_cv.dtype), v_cv, preferred_element_type=jnp.float32)
            acc_ref[g] = acc_ref[g] * lanes(alpha, fmt.v_dim) + pv

    m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    first, last = first_ref[i], last_ref[i]
    end_first = span(first)[3]

    @pl.when((first <= last) & (end_first > 0))
    def _prologue():
        dma(first, 0, 0, end_first, start=True)

    def step(carry):
        """One (sequence, kv block) step; a sequence with no rows here takes one empty step."""
        s, j, slot = carry
        lo, hi, off, end = span(s)
        n_blocks = div(end + c - 1, c)
        advance = j + 1 < n_blocks
        s_next, j_next = jnp.where(advance, s, s + 1), jnp.where(advance, j + 1, 0)
        end_next = span(jnp.minimum(s_next, d.seqs - 1))[3]

        @pl.when((s_next <= last) & (j_next * c < end_next))
        def _prefetch():
            dma(s_next, j_next, 1 - slot, end_next, start=True)

        @pl.when(j < n_blocks)
        def _run():
            dma(s, j, slot, end, start=False)
            compute(lo, hi, off, end, j, slot)

        return s_next, j_next, 1 - slot

    jax.lax.while_loop(lambda carry: carry[0] <= last, step, (first, jnp.int32(0), jnp.int32(0)))

    for g in range(d.kv_heads):
        total = l_ref[g]
        safe = jnp.where(total == 0.0, 1.0, total)
        o_ref[g] = (acc_ref[g] / lanes(safe, fmt.v_dim)).astype(o_ref.dtype)


def _overlaps(cu_q_lens_s1, num_seqs, nq: int, bq: int):
    """First and last sequence with real tokens in each query block (last < first: none)."""
    s = cu_q_lens_s1.shape[0] - 1
    real_end = cu_q_lens_s1[jnp.minimum(num_seqs, s)]
    lo = jnp.arange(nq, dtype=jnp.int32) * bq
    hi = jnp.minimum(lo + bq, real_end)

    def seq_of(tok):
        return jnp.minimum(jnp.searchsorted(cu_q_lens_s1[1:], tok, side="right").astype(jnp.int32), s - 1)

    first = seq_of(lo)
    last = jnp.where(hi > lo, seq_of(hi - 1), first - 1)
    return first, last


def ragged_paged_attention(
    q_thk,
    pool_lnpgw,
    kv_lens_s,
    page_table_sm,
    cu_q_lens_s1,
    num_seqs,
    layer,
    *,
    scale: float,
    fmt: RowFormat,
    interpret: bool = False,
    blocks: BlockSizes | None = None,
):
    """-> out [T, H, v_dim] in q's dtype. ``num_seqs`` and ``layer`` are int32 scalars (traced is fine)."""
    blocks = blocks or BlockSizes()
    t, h, k = q_thk.shape
    _, n, p, g, w = pool_lnpgw.shape
    s, m = page_table_sm.shape
    r = h // g
    bq = min(blocks.q_tokens, round_up(t, SUBLANES))
    nq = -(-t // bq)
    tp = nq * bq
    d = _Dims(bq, r, g, s, m, n, p, min(blocks.pages_per_block, m), fmt, float(scale))

    q_grk = jnp.pad(q_thk, ((0, tp - t), (0, 0), (0, 0))).reshape(tp, g, r, k).transpose(1, 0, 2, 3)
    q_grk = q_grk.reshape(g, tp * r, k)
    pool = pool_lnpgw.reshape(pool_lnpgw.shape[:3] + (w,)) if g == 1 else pool_lnpgw  # MLA: pages as [P, W]
    page_shape = pool.shape[2:]
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(1)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, pool.shape[0] - 1).reshape(1)
    first, last = _overlaps(cu_q_lens_s1.astype(jnp.int32), num_seqs[0], nq, bq)
    scalars = (
        kv_lens_s.astype(jnp.int32),
        page_table_sm.astype(jnp.int32).reshape(-1),
        cu_q_lens_s1.astype(jnp.int32),
        num_seqs,
        layer,
        first,
        last,
    )

    def q_map(i, *refs):
        return 0, i, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(nq,),
        in_specs=[pl.BlockSpec((g, d.rows, k), q_map), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((g, d.rows, fmt.v_dim), q_map),
        scratch_shapes=[
            pltpu.VMEM((2, d.keys, *page_shape[1:]), pool.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((g, d.rows, LANES), jnp.float32),
            pltpu.VMEM((g, d.rows, LANES), jnp.float32),
            pltpu.VMEM((g, d.rows, fmt.v_dim), jnp.float32),
        ],
    )
    mode = pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()) if interpret else contextlib.nullcontext()
    with mode:
        out = pl.pallas_call(
            functools.partial(_kernel, d=d),
            grid_spec=grid_spec,
            out_shape=jax.ShapeDtypeStruct((g, tp * r, fmt.v_dim), q_thk.dtype),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
            name="moela_ragged_paged_attention",
        )(*scalars, q_grk, pool)
    out = out.reshape(g, tp, r, fmt.v_dim).transpose(1, 0, 2, 3).reshape(tp, h, fmt.v_dim)
    return out[:t]
