"""Flash attention for TPU (Pallas Mosaic): forward, dq and dk/dv kernels.

Semantics are those of ``kernels.reference`` (queries are the last T of S positions, segment
ids, GQA, Dqk != Dv, float32 softmax, rows that see nothing give 0 and lse -inf). The
wrapper puts heads first and pads::

    q [B, T, H, K] -> [B, H, Tp, Kp]     k [B, S, G, K] -> [B, G, Sp, Kp]     v -> [B, G, Sp, Vp]

Tp / Sp round T / S up to the block sizes; K or V above 128 that are not a multiple of 128
(MLA's 192) are zero-padded to one, so every matmul operand is whole (8, 128) tiles and the
row statistics can be broadcast by lane tiling. Padded keys are masked by position; padded
query rows are sliced off (their lse is +inf in the backward, so they contribute nothing).

Forward, grid (B, H, Tp/bq, Sp/bk), the last axis sequential: the running max ``m``, sum
``l`` (lane-replicated [bq, 128]) and the float32 output accumulator live in VMEM scratch; the
output and lse leave at the last KV step.

Block skipping. Small tables are scalar-prefetched into SMEM (``_Tables``): the segment-id
range of every q and kv block, and for every block of the parallel axis the first and last
block of the sequential axis it must visit — above the causal diagonal nothing is visible,
and blocks whose segment ranges do not meet (other documents of a packed row) neither. A
skipped block costs nothing twice over: the body does not run (``pl.when``) and the index
maps clamp the block index into [first, last], so the pipeline sees the same block again and
issues no DMA. Blocks entirely below the diagonal, off the padded tail, and inside one
document run without building the element mask at all.

Backward (P recomputed as exp(s - lse), delta = rowsum(dO * O) - dlse from the wrapper):

* dq: grid (B, H, Tp/bq, Sp/bk), dS = P * (dO·Vᵀ - delta), dq += scale·dS·K in scratch.
* dk/dv: grid (B, G, Sp/bk, R, Tp/bq) with R = H / G, so the R query heads of a kv head and
  all their q blocks reduce into one dk/dv scratch (GQA sums happen in VMEM). It works in
  the transposed orientation sᵀ = K·Qᵀ [bk, bq], so every product is an NN or NT matmul and
  lse / delta enter as lane-dense rows. Skipped q blocks repeat the first visible one in
  the index maps (no DMA) as in the forward.

Layouts of the small operands follow what Mosaic tiles natively: forward lse leaves
lane-replicated [.., Tp, 128]; q segment ids enter lane-replicated [B, Tp, 128] where they
index rows, kv segment ids sublane-replicated [B, 8, Sp] where they index columns (and the
other way round in the dk/dv kernel); lse / delta enter the dq kernel as [B, H, 1, Tp] rows
(read back as columns) and the dk/dv kernel as [B, H, 8, Tp].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moela.kernels import blocks as schedule
from moela.kernels.common import LANES, NEG_INF, NT_DIMS, SUBLANES, div, fit_block, lane_aligned, lanes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per block. q blocks must be multiples of 128 (8 suffices when one block covers T)
    and kv blocks multiples of 128; shorter sequences use one smaller block."""

    block_q: int = 512
    block_k: int = 512
    block_q_dq: int = 256
    block_k_dq: int = 512
    block_q_dkv: int = 256
    block_k_dkv: int = 512

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value <= 0 or value % LANES:
                raise ValueError(f"BlockSizes.{name} must be a positive multiple of {LANES}, got {value}")

    @classmethod
    def for_generation(cls, generation: str) -> BlockSizes:
        """Defaults per TPU generation (scoped VMEM: 16 MiB on v4/v5e, 32 MiB on v5p/v6e).

        Not tuned on hardware here (no TPU); the sizes keep each step's working set (double
        buffered q, k, v blocks, the [bq, bk] float32 logits and scratch) a few MiB at
        Dqk 256 / Dv 128."""
        small = cls(block_q=256, block_k=512, block_q_dq=256, block_k_dq=256, block_q_dkv=256, block_k_dkv=256)
        table = {"v4": small, "v5e": small, "v5 lite": small, "v5p": cls(), "v6e": cls(), "v5": cls()}
        for key, sizes in table.items():
            if key in generation.lower():
                return sizes
        return cls()


def default_blocks() -> BlockSizes:
    """The table entry for the local TPU, or the v5p defaults elsewhere."""
    try:
        device = jax.devices()[0]
        return BlockSizes.for_generation(device.device_kind) if device.platform == "tpu" else BlockSizes()
    except RuntimeError:  # pragma: no cover - no backend at all
        return BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Geometry(schedule.Geometry):
    """The shared block geometry plus this kernel's block bounds and masks."""

    def crosses(self, i, j):
        """Does the causal diagonal or the padded tail cut through block (i, j)?"""
        need = self.s % self.bk != 0 and j == self.nk - 1
        if self.causal:
            need = jnp.logical_or(need, (j + 1) * self.bk - 1 > i * self.bq + self.offset)
        return need

    def mask(self, i, j, shape, q_axis: int, q_seg=None, kv_seg=None):
        """Visibility of a [bq, bk] (q_axis 0) or [bk, bq] (q_axis 1) block."""
        q_pos = jax.lax.broadcasted_iota(jnp.int32, shape, q_axis) + i * self.bq + self.offset
        k_pos = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + j * self.bk
        mask = k_pos < self.s
        if self.causal:
            mask = jnp.logical_and(mask, q_pos >= k_pos)
        if q_seg is not None:
            mask = jnp.logical_and(mask, q_seg == kv_seg)
        return mask

    def when_visible(self, tables, b, i, j, body):
        """Run ``body(masked)`` if block (i, j) has any visible pair: with the element mask only
        where the diagonal, the padded tail or a segment boundary crosses it."""
        run, need = self.visible(i, j), self.crosses(i, j)
        if self.segmented:
            q_lo, q_hi = tables.q_lo[b, i], tables.q_hi[b, i]
            kv_lo, kv_hi = tables.kv_lo[b, j], tables.kv_hi[b, j]
            run = jnp.logical_and(run, jnp.logical_and(q_lo <= kv_hi, kv_lo <= q_hi))
            one_segment = jnp.logical_and(jnp.logical_and(q_lo == q_hi, kv_lo == kv_hi), q_lo == kv_lo)
            need = jnp.logical_or(need, jnp.logical_not(one_segment))
        if isinstance(need, bool):
            pl.when(run)(functools.partial(body, need))
            return
        pl.when(jnp.logical_and(run, need))(functools.partial(body, True))
        pl.when(jnp.logical_and(run, jnp.logical_not(need)))(functools.partial(body, False))


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Scalar-prefetched block tables (SMEM): segment-id ranges per q block [B, nq] and kv
    block [B, nk], and for each block of the parallel axis the first and last block of the
    sequential axis it must visit (causal and segment ranges together). Index maps clamp the
    sequential block index into [first, last], so skipped blocks cost no DMA."""

    q_lo: jax.Array
    q_hi: jax.Array
    kv_lo: jax.Array
    kv_hi: jax.Array
    first: jax.Array
    last: jax.Array

    @classmethod
    def build(cls, q_seg, kv_seg, geo: _Geometry, b: int, over: str) -> _Tables:
        """``over="kv"``: first/last kv block per q block [B, nq]; ``"q"``: q block per kv block [B, nk]."""
        q_lo, q_hi = schedule.segment_ranges(q_seg, geo.nq, geo.bq)
        kv_lo, kv_hi = schedule.segment_ranges(kv_seg, geo.nk, geo.bk)
        q_lo, q_hi, kv_lo, kv_hi = (jnp.broadcast_to(x, (b, x.shape[1])) for x in (q_lo, q_hi, kv_lo, kv_hi))
        i, j = jnp.arange(geo.nq)[:, None], jnp.arange(geo.nk)[None, :]
        active = schedule.active_pairs(q_lo, q_hi, kv_lo, kv_hi, geo.visible(i, j))
        first, last, some = schedule.span(active, -1 if over == "kv" else 1)
        first, last = jnp.where(some, first, 0), jnp.where(some, last, 0)  # nothing: stay on block 0, run nothing
        return cls(q_lo, q_hi, kv_lo, kv_hi, first, last)

    def arrays(self):
        return [self.q_lo, self.q_hi, self.kv_lo, self.kv_hi, self.first, self.last]

    @classmethod
    def of_refs(cls, refs) -> _Tables:
        return cls(*refs)

    def clamp(self, b, outer, inner):
        """Sequential block index ``inner`` clamped into [first, last] of parallel block ``outer``."""
        return jnp.minimum(jnp.maximum(inner, self.first[b, outer]), self.last[b, outer])


# ---------------------------------------------------------------- forward


def _forward_kernel(*refs, geo, segmented):
    tables, refs = _Tables.of_refs(refs[:6]), refs[6:]
    q_ref, k_ref, v_ref = refs[:3]
    qseg_ref, kvseg_ref = refs[3:5] if segmented else (None, None)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[5:] if segmented else refs[3:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s_qk = jax.lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * geo.scale
        if masked:
            segs = (lanes(qseg_ref[...], geo.bk), kvseg_ref[:1, :]) if segmented else (None, None)
            mask = geo.mask(i, j, s_qk.shape, 0, *segs)
            s_qk = jnp.where(mask, s_qk, NEG_INF)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s_qk, axis=1)[:, None])  # [bq, 128]
        p = jnp.exp(s_qk - lanes(m_next, geo.bk))
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        m_ref[...] = m_next
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * lanes(alpha, acc_ref.shape[1]) + pv

    geo.when_visible(tables, b, i, j, body)

    @pl.when(j == geo.nk - 1)
    def _store():
        total = l_ref[...]
        empty = total == 0.0
        safe = jnp.where(empty, 1.0, total)
        o_ref[...] = (acc_ref[...] / lanes(safe, acc_ref.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(safe))


def _segments(q_seg, kv_seg, geo, tp, sp):
    """Padded segment ids in both tilings: rows lane-replicated, columns sublane-replicated."""
    b = q_seg.shape[0]
    q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, tp - geo.t)), constant_values=-1)
    kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, sp - geo.s)), constant_values=-2)
    return {
        "q_rows": jnp.broadcast_to(q_seg[:, :, None], (b, tp, LANES)),
        "q_cols": jnp.broadcast_to(q_seg[:, None, :], (b, SUBLANES, tp)),
        "kv_rows": jnp.broadcast_to(kv_seg[:, :, None], (b, sp, LANES)),
        "kv_cols": jnp.broadcast_to(kv_seg[:, None, :], (b, SUBLANES, sp)),
    }


def _head_major(x_bthd, rows: int, dim: int):
    """[B, T, H, D] -> zero-padded [B, H, rows, dim]."""
    x = x_bthd.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, dim - x.shape[3])))


def _spec(rows: int, cols: int, index_map):
    return pl.BlockSpec((None, None, rows, cols), index_map)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, semantics, interpret, name):
    """pallas_call with the six block tables scalar-prefetched ahead of the other inputs."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret,
        name=name,
    )


def forward(
    q,
    k,
    v,
    q_segment_ids,
    kv_segment_ids,
    *,
    scale: float,
    causal: bool,
    interpret: bool = False,
    blocks: BlockSizes | None = None,
):
    """-> (out [B, T, H, V] in q's dtype, lse [B, H, T] float32)."""
    schedule.validate(q, k, v, q_segment_ids, kv_segment_ids)
    blocks = blocks or default_blocks()
    b, t, h, dk = q.shape
    s, g, dv = k.shape[1], k.shape[2], v.shape[3]
    r = h // g
    geo = _Geometry(
        t,
        s,
        fit_block(t, blocks.block_q, SUBLANES),
        fit_block(s, blocks.block_k, LANES),
        causal,
        q_segment_ids is not None,
        float(scale),
    )
    tp, sp, dkp, dvp = geo.nq * geo.bq, geo.nk * geo.bk, lane_aligned(dk), lane_aligned(dv)
    tables = _Tables.build(q_segment_ids, kv_segment_ids, geo, b, over="kv")

    def q_map(bi, hi, i, j, *refs):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, *refs):
        return bi, div(hi, r), _Tables.of_refs(refs).clamp(bi, i, j), 0

    in_specs = [_spec(geo.bq, dkp, q_map), _spec(geo.bk, dkp, kv_map), _spec(geo.bk, dvp, kv_map)]
    args = [_head_major(q, tp, dkp), _head_major(k, sp, dkp), _head_major(v, sp, dvp)]
    if geo.segmented:
        segs = _segments(q_segment_ids, kv_segment_ids, geo, tp, sp)
        in_specs += [
            pl.BlockSpec((None, geo.bq, LANES), lambda bi, hi, i, j, *refs: (bi, i, 0)),
            pl.BlockSpec((None, SUBLANES, geo.bk), lambda *ix: (ix[0], 0, kv_map(*ix)[2])),
        ]
        args += [segs["q_rows"], segs["kv_cols"]]
    out, lse = _call(
        functools.partial(_forward_kernel, geo=geo, segmented=geo.segmented),
        grid=(b, h, geo.nq, geo.nk),
        in_specs=in_specs,
        out_specs=[_spec(geo.bq, dvp, q_map), _spec(geo.bq, LANES, q_map)],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp, LANES), jnp.float32),
        ],
        scratch=[
            pltpu.VMEM((geo.bq, LANES), jnp.float32),
            pltpu.VMEM((geo.bq, LANES), jnp.float32),
            pltpu.VMEM((geo.bq, dvp), jnp.float32),
        ],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="moela_flash_fwd",
    )(*tables.arrays(), *args)
    return out[:, :, :t, :dv].transpose(0, 2, 1, 3), lse[:, :, :t, 0]


# ---------------------------------------------------------------- backward


def _dq_kernel(*refs, geo, segmented):
    tables, refs = _Tables.of_refs(refs[:6]), refs[6:]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qseg_ref, kvseg_ref = refs[6:8] if segmented else (None, None)
    dq_ref, acc_ref = refs[-2:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_qk = jax.lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * geo.scale
        p = jnp.exp(s_qk - lse_ref[0][:, None])  # lse +inf on rows that see nothing: P = 0
        if masked:
            segs = (lanes(qseg_ref[...], geo.bk), kvseg_ref[:1, :]) if segmented else (None, None)
            p = jnp.where(geo.mask(i, j, s_qk.shape, 0, *segs), p, 0.0)
        dp = jax.lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[0][:, None])
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * geo.scale

    geo.when_visible(tables, b, i, j, body)

    @pl.when(j == geo.nk - 1)
    def _store():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, geo, segmented, heads_per_kv: int):
    tables, refs = _Tables.of_refs(refs[:6]), refs[6:]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    qseg_ref, kvseg_ref = refs[6:8] if segmented else (None, None)
    dk_ref, dv_ref, dk_acc, dv_acc = refs[-4:]
    b, j, r, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(r == 0, i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_kq = jax.lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32) * geo.scale  # sᵀ [bk, bq]
        p_kq = jnp.exp(s_kq - lse_ref[:1, :])
        if masked:
            segs = (qseg_ref[:1, :], lanes(kvseg_ref[...], geo.bq)) if segmented else (None, None)
            p_kq = jnp.where(geo.mask(i, j, s_kq.shape, 1, *segs), p_kq, 0.0)
        dv_acc[...] += jnp.dot(p_kq.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_kq = jax.lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
        ds_kq = p_kq * (dp_kq - delta_ref[:1, :])
        dk_acc[...] += jnp.dot(ds_kq.astype(q.dtype), q, preferred_element_type=jnp.float32) * geo.scale

    geo.when_visible(tables, b, i, j, body)

    @pl.when(jnp.logical_and(r == heads_per_kv - 1, i == geo.nq - 1))
    def _store():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _row_stats(lse_bht, delta_bht, tp: int, sublanes: int):
    """lse (+inf where nothing is visible, so P = 0) and delta, padded to [B, H, sublanes, Tp]."""
    b, h, t = lse_bht.shape
    lse = jnp.where(jnp.isfinite(lse_bht), lse_bht, jnp.inf)
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=jnp.inf)
    delta = jnp.pad(delta_bht, ((0, 0), (0, 0), (0, tp - t)))
    return (
        jnp.broadcast_to(lse[:, :, None], (b, h, sublanes, tp)),
        jnp.broadcast_to(delta[:, :, None], (b, h, sublanes, tp)),
    )


def backward(
    q,
    k,
    v,
    q_segment_ids,
    kv_segment_ids,
    out,
    lse,
    d_out,
    d_lse,
    *,
    scale: float,
    causal: bool,
    interpret: bool = False,
    blocks: BlockSizes | None = None,
):
    """-> (dq [B, T, H, K], dk [B, S, G, K], dv [B, S, G, V]) in q's, k's and v's dtypes.

    ``out`` [B, T, H, V] and ``lse`` [B, H, T] may belong to a larger attention this block is
    part of (ring attention); ``d_lse`` (or None) is the log-sum-exp's cotangent."""
    schedule.validate(q, k, v, q_segment_ids, kv_segment_ids)
    blocks = blocks or default_blocks()
    t, s = q.shape[1], k.shape[1]
    delta = jnp.einsum("bthv,bthv->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    args = (q, k, v, q_segment_ids, kv_segment_ids, d_out, lse.astype(jnp.float32), delta)

    def geometry(block_q, block_k):
        return _Geometry(
            t,
            s,
            fit_block(t, block_q, SUBLANES),
            fit_block(s, block_k, LANES),
            causal,
            q_segment_ids is not None,
            float(scale),
        )

    dq = _dq_call(*args, geo=geometry(blocks.block_q_dq, blocks.block_k_dq), interpret=interpret)
    dk, dv = _dkv_call(*args, geo=geometry(blocks.block_q_dkv, blocks.block_k_dkv), interpret=interpret)
    return dq, dk, dv


def _dq_call(q, k, v, q_seg, kv_seg, d_out, lse, delta, *, geo, interpret):
    """dq kernel: q blocks in parallel, kv blocks sequential."""
    b, t, h, dk = q.shape
    g, dv = k.shape[2], v.shape[3]
    r, dkp, dvp = h // g, lane_aligned(dk), lane_aligned(dv)
    tp, sp = geo.nq * geo.bq, geo.nk * geo.bk
    lse_rows, delta_rows = _row_stats(lse, delta, tp, 1)
    tables = _Tables.build(q_seg, kv_seg, geo, b, over="kv")

    def q_map(bi, hi, i, j, *refs):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, *refs):
        return bi, div(hi, r), _Tables.of_refs(refs).clamp(bi, i, j), 0

    def row_map(bi, hi, i, j, *refs):
        return bi, hi, 0, i

    in_specs = [
        _spec(geo.bq, dkp, q_map),
        _spec(geo.bk, dkp, kv_map),
        _spec(geo.bk, dvp, kv_map),
        _spec(geo.bq, dvp, q_map),
        _spec(1, geo.bq, row_map),
        _spec(1, geo.bq, row_map),
    ]
    args = [
        _head_major(q, tp, dkp),
        _head_major(k, sp, dkp),
        _head_major(v, sp, dvp),
        _head_major(d_out, tp, dvp),
        lse_rows,
        delta_rows,
    ]
    if geo.segmented:
        segs = _segments(q_seg, kv_seg, geo, tp, sp)
        in_specs += [
            pl.BlockSpec((None, geo.bq, LANES), lambda bi, hi, i, j, *refs: (bi, i, 0)),
            pl.BlockSpec((None, SUBLANES, geo.bk), lambda *ix: (ix[0], 0, kv_map(*ix)[2])),
        ]
        args += [segs["q_rows"], segs["kv_cols"]]
    dq = _call(
        functools.partial(_dq_kernel, geo=geo, segmented=geo.segmented),
        grid=(b, h, geo.nq, geo.nk),
        in_specs=in_specs,
        out_specs=_spec(geo.bq, dkp, q_map),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, dkp), q.dtype),
        scratch=[pltpu.VMEM((geo.bq, dkp), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="moela_flash_dq",
    )(*tables.arrays(), *args)
    return dq[:, :, :t, :dk].transpose(0, 2, 1, 3)


def _dkv_call(q, k, v, q_seg, kv_seg, d_out, lse, delta, *, geo, interpret):
    """dk/dv kernel: kv blocks in parallel; the group's query heads and all q blocks sequential."""
    b, t, h, dk = q.shape
    s, g, dv = k.shape[1], k.shape[2], v.shape[3]
    r, dkp, dvp = h // g, lane_aligned(dk), lane_aligned(dv)
    tp, sp = geo.nq * geo.bq, geo.nk * geo.bk
    lse_rows, delta_rows = _row_stats(lse, delta, tp, SUBLANES)
    tables = _Tables.build(q_seg, kv_seg, geo, b, over="q")

    def q_map(bi, gi, j, ri, i, *refs):
        return bi, gi * r + ri, _Tables.of_refs(refs).clamp(bi, j, i), 0

    def kv_map(bi, gi, j, ri, i, *refs):
        return bi, gi, j, 0

    def row_map(*ix):
        bi, hi, ic, _ = q_map(*ix)
        return bi, hi, 0, ic

    in_specs = [
        _spec(geo.bq, dkp, q_map),
        _spec(geo.bk, dkp, kv_map),
        _spec(geo.bk, dvp, kv_map),
        _spec(geo.bq, dvp, q_map),
        _spec(SUBLANES, geo.bq, row_map),
        _spec(SUBLANES, geo.bq, row_map),
    ]
    args = [
        _head_major(q, tp, dkp),
        _head_major(k, sp, dkp),
        _head_major(v, sp, dvp),
        _head_major(d_out, tp, dvp),
        lse_rows,
        delta_rows,
    ]
    if geo.segmented:
        segs = _segments(q_seg, kv_seg, geo, tp, sp)
        in_specs += [
            pl.BlockSpec((None, SUBLANES, geo.bq), lambda *ix: (ix[0], 0, row_map(*ix)[3])),
            pl.BlockSpec((None, geo.bk, LANES), lambda bi, gi, j, ri, i, *refs: (bi, j, 0)),
        ]
        args += [segs["q_cols"], segs["kv_rows"]]
    dk_p, dv_p = _call(
        functools.partial(_dkv_kernel, geo=geo, segmented=geo.segmented, heads_per_kv=r),
        grid=(b, g, geo.nk, r, geo.nq),
        in_specs=in_specs,
        out_specs=[_spec(geo.bk, dkp, kv_map), _spec(geo.bk, dvp, kv_map)],
        out_shape=[jax.ShapeDtypeStruct((b, g, sp, dkp), k.dtype), jax.ShapeDtypeStruct((b, g, sp, dvp), v.dtype)],
        scratch=[pltpu.VMEM((geo.bk, dkp), jnp.float32), pltpu.VMEM((geo.bk, dvp), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="moela_flash_dkv",
    )(*tables.arrays(), *args)
    return dk_p[:, :, :s, :dk].transpose(0, 2, 1, 3), dv_p[:, :, :s, :dv].transpose(0, 2, 1, 3)
