"""Flash attention for GPU (Pallas Triton): forward, dq and dk/dv kernels.

Semantics are those of ``kernels.reference`` (queries are the last T of S positions, segment
ids, GQA, Dqk != Dv, float32 softmax, rows that see nothing give 0 and lse -inf). Layouts stay
[B, T, H, D]: a block is a strided tile of one head, so the wrapper only pads —

    T, S up to multiples of the block sizes; Dqk, Dv up to powers of two (>= 16)

because Triton tiles must be powers of two and ``tl.dot`` needs every side >= 16 (MLA's 192
runs as 256, the zero columns change nothing; padded keys are masked by position, padded
query rows are sliced off).

* Forward, grid (T/bq, B, H): the query tile stays in registers while a loop walks the KV
  tiles with an online softmax. Under the causal mask the loop ends at the last tile the
  block can see (causal block skipping; offset S - T), and runs in two parts: tiles wholly
  below the diagonal without any mask, then the diagonal tiles masked. With segment ids the
  loop covers only the span of KV tiles whose ids meet the query tile's (other documents of
  a packed row are never loaded; ``kernels.blocks``), all masked.
* dq, grid (T/bq, B, H): the same walk, P recomputed as exp(s - lse).
* dk/dv, grid (S/bk, B, G): each program owns one KV tile of one kv head and walks the query
  tiles that can see it (causally and by document span), for each of the kv head's H/G query heads in turn, so GQA sums
  happen in registers; dS = P * (dO·Vᵀ - delta) with delta = rowsum(dO * O) - dlse from
  the wrapper.

Why Triton and not Mosaic GPU: Triton kernels run on A100 (sm80) and H100 (sm90) alike,
while Mosaic GPU targets Hopper-and-later warpgroup code (``plgpu`` with explicit
wgmma/TMA), and a default ``pallas_call`` on ``cuda`` goes to Mosaic GPU, which fails on a
plain ``dot_general`` here (NOTES.md). A Hopper-specific Mosaic GPU variant would be faster on
H100 and is separate work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moela.kernels import blocks as schedule
from moela.kernels.common import NEG_INF, pow2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile rows (powers of two, >= 16) and launch parameters; ``num_warps`` None picks 4 for
    head dims up to 64 and 8 above. The shapes of the usual Triton flash-attention schedule
    (a tall query tile forward and for dq, a tall KV tile for dk/dv); untuned on hardware
    here (no GPU)."""

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 128
    block_k_dq: int = 32
    block_q_dkv: int = 32
    block_k_dkv: int = 128
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {value}")


def _dot(a, b, trans_b: bool = False):
    """a @ b (or a @ bᵀ), accumulated in float32 (float32 inputs in IEEE precision, not TF32);
    ``pl.dot`` is deprecated in jax 0.11 and gone in 0.12."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (((1,), (1 if trans_b else 0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


@dataclasses.dataclass(frozen=True)
class _Geometry(schedule.Geometry):
    """The shared block geometry plus this kernel's block bounds and masks."""

    def kv_range(self, i):
        """(end of the unmasked KV tiles, end of all visible KV tiles) for q tile ``i``."""
        full_end = self.s // self.bk  # tiles without padded keys
        if not self.causal:
            return (0 if self.segmented else full_end), self.nk
        last_pos = (i + 1) * self.bq - 1 + self.offset  # the last query's position
        end = jnp.minimum(jax.lax.div(jnp.maximum(last_pos + 1, 0) + self.bk - 1, self.bk), self.nk)
        clean = jnp.minimum(jax.lax.div(jnp.maximum(i * self.bq + self.offset + 1, 0), self.bk), full_end)
        return (0 if self.segmented else jnp.minimum(clean, end)), end

    def q_range(self, j):
        """(first visible q tile, first q tile that sees all of KV tile ``j`` unmasked).

        Written without ``jnp.where``: the Triton lowering of a scalar select here produced an
        ill-typed loop bound (caught by the export test's MLIR verification)."""
        last_tile = (j == self.nk - 1).astype(jnp.int32) if self.s % self.bk else 0  # padded keys: masked
        if not self.causal:
            return 0, (self.nq if self.segmented else last_tile * self.nq)
        first = jnp.minimum(jax.lax.div(jnp.maximum(j * self.bk - self.offset, 0), self.bq), self.nq)
        if self.segmented:
            return first, self.nq
        clean = jax.lax.div(jnp.maximum((j + 1) * self.bk - 1 - self.offset, 0) + self.bq - 1, self.bq)
        clean = jnp.maximum(jnp.maximum(clean, last_tile * self.nq), first)
        return first, jnp.minimum(clean, self.nq)

    def mask(self, i, j, rows: int, cols: int, q_axis: int, q_seg=None, kv_seg=None):
        """Visibility of a [bq, bk] (q_axis 0) or [bk, bq] (q_axis 1) tile."""
        q_len, k_len = (rows, cols) if q_axis == 0 else (cols, rows)
        q_pos = i * self.bq + jnp.arange(q_len) + self.offset
        k_pos = j * self.bk + jnp.arange(k_len)
        q_pos, k_pos = (q_pos[:, None], k_pos[None, :]) if q_axis == 0 else (q_pos[None, :], k_pos[:, None])
        mask = k_pos < self.s
        if self.causal:
            mask = mask & (q_pos >= k_pos)
        if q_seg is not None:
            mask = mask & ((q_seg[:, None] == kv_seg[None, :]) if q_axis == 0 else (q_seg[None, :] == kv_seg[:, None]))
        return mask


def _two_loops(lo, mid, hi, body, carry):
    """``body(index, carry, masked)`` over [lo, mid) unmasked, then [mid, hi) masked."""
    carry = jax.lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(jnp.maximum(lo, mid), hi, functools.partial(body, masked=True), carry)


# ---------------------------------------------------------------- kernels


def _spanned(lo, hi, first_ref, last_ref):
    """[lo, hi) narrowed to the tiles whose segment ids meet (packed documents), if given."""
    if first_ref is None:
        return lo, hi
    return jnp.maximum(lo, first_ref[0]), jnp.minimum(hi, last_ref[0] + 1)


def _forward_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, first_ref, last_ref, o_ref, lse_ref, *, geo):
    i = pl.program_id(0)
    q = q_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry, masked):
        acc, m, total = carry
        k = k_ref[pl.ds(j * geo.bk, geo.bk), :]
        v = v_ref[pl.ds(j * geo.bk, geo.bk), :]
        s_qk = _dot(q, k, trans_b=True).astype(jnp.float32) * geo.scale
        if masked:
            kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(j * geo.bk, geo.bk)]
            mask = geo.mask(i, j, geo.bq, geo.bk, 0, q_seg, kv_seg)
            s_qk = jnp.where(mask, s_qk, NEG_INF)
        m_next = jnp.maximum(m, jnp.max(s_qk, axis=1))
        p = jnp.exp(s_qk - m_next[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_next)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_next, total * alpha + jnp.sum(p, axis=1)

    clean, end = geo.kv_range(i)
    start, end = _spanned(0, end, first_ref, last_ref)
    init = (
        jnp.zeros((geo.bq, v_ref.shape[-1]), jnp.float32),
        jnp.full((geo.bq,), NEG_INF, jnp.float32),
        jnp.zeros((geo.bq,), jnp.float32),
    )
    acc, m, total = _two_loops(start, clean, end, body, init)
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(safe))


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, first_ref, last_ref, dq_ref, *, geo
):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, acc, masked):
        k = k_ref[pl.ds(j * geo.bk, geo.bk), :]
        v = v_ref[pl.ds(j * geo.bk, geo.bk), :]
        s_qk = _dot(q, k, trans_b=True).astype(jnp.float32) * geo.scale
        p = jnp.exp(s_qk - lse[:, None])  # lse +inf on rows that see nothing: P = 0
        if masked:
            kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(j * geo.bk, geo.bk)]
            p = jnp.where(geo.mask(i, j, geo.bq, geo.bk, 0, q_seg, kv_seg), p, 0.0)
        dp = _dot(do, v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - delta[:, None])
        return acc + _dot(ds.astype(k.dtype), k).astype(jnp.float32)

    clean, end = geo.kv_range(i)
    start, end = _spanned(0, end, first_ref, last_ref)
    acc = _two_loops(start, clean, end, body, jnp.zeros((geo.bq, q_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (acc * geo.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    kvseg_ref,
    first_ref,
    last_ref,
    dk_ref,
    dv_ref,
    *,
    geo,
    heads_per_kv: int,
):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    first, clean = geo.q_range(j)
    first, end = _spanned(first, geo.nq, first_ref, last_ref)

    def body(i, carry, masked, head):
        dk, dv = carry
        rows = pl.ds(i * geo.bq, geo.bq)
        q = q_ref[rows, head, :]
        do = do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        s_kq = _dot(k, q, trans_b=True).astype(jnp.float32) * geo.scale  # sᵀ [bk, bq]
        p = jnp.exp(s_kq - lse[None, :])
        if masked:
            q_seg = None if qseg_ref is None else qseg_ref[rows]
            p = jnp.where(geo.mask(i, j, geo.bk, geo.bq, 1, q_seg, kv_seg), p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do).astype(jnp.float32)
        dp = _dot(v, do, trans_b=True).astype(jnp.float32)
        ds = p * (dp - delta[None, :])
        return dk + _dot(ds.astype(q.dtype), q).astype(jnp.float32), dv

    carry = (jnp.zeros((geo.bk, k_ref.shape[-1]), jnp.float32), jnp.zeros((geo.bk, v_ref.shape[-1]), jnp.float32))
    for head in range(heads_per_kv):  # the kv head's query heads, unrolled: their sums stay in registers
        step = functools.partial(body, head=head)
        # q tiles in [first, clean) cross the diagonal (masked); [clean, end) see all of this KV tile
        carry = jax.lax.fori_loop(first, jnp.minimum(clean, end), functools.partial(step, masked=True), carry)
        carry = jax.lax.fori_loop(jnp.maximum(first, clean), end, functools.partial(step, masked=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * geo.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------- wrappers


def _geometry(t, s, block_q, block_k, causal, segmented, scale):
    return _Geometry(t, s, min(block_q, pow2(t, 16)), min(block_k, pow2(s, 16)), causal, segmented, float(scale))


def _pad(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _tile_entry(index_map):
    """The one entry of a [B, tiles] table that belongs to the program's tile."""
    return pl.BlockSpec((None, 1), index_map)


def _params(blocks: BlockSizes, *dims: int):
    warps = blocks.num_warps or (4 if max(dims) <= 64 else 8)
    return pltriton.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _segments(q_seg, kv_seg, geo, tp, sp, over: str):
    """Padded segment ids and, per tile of the parallel axis, the span [first, last] of tiles
    on the other axis whose ids meet it (``schedule``; an empty span is [0, -1])."""
    if q_seg is None:
        return []
    q_lo, q_hi = schedule.segment_ranges(q_seg, geo.nq, geo.bq)
    kv_lo, kv_hi = schedule.segment_ranges(kv_seg, geo.nk, geo.bk)
    i, j = jnp.arange(geo.nq)[:, None], jnp.arange(geo.nk)[None, :]
    active = schedule.active_pairs(q_lo, q_hi, kv_lo, kv_hi, geo.visible(i, j))
    first, last, some = schedule.span(active, -1 if over == "kv" else 1)
    return [
        _pad(q_seg.astype(jnp.int32), 1, tp, -1),
        _pad(kv_seg.astype(jnp.int32), 1, sp, -2),
        jnp.where(some, first, 0),
        jnp.where(some, last, -1),
    ]


def _with_segments(kernel, segmented: bool, position: int):
    """``kernel`` with None for the segment and span refs at ``position`` when unsegmented."""
    if segmented:
        return kernel

    def wrapped(*refs, **kwargs):
        return kernel(*refs[:position], None, None, None, None, *refs[position:], **kwargs)

    return wrapped


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
    blocks = blocks or BlockSizes()
    b, t, h, dk = q.shape
    s, g, dv = k.shape[1], k.shape[2], v.shape[3]
    r, dkp, dvp = h // g, pow2(dk, 16), pow2(dv, 16)
    geo = _geometry(t, s, blocks.block_q, blocks.block_k, causal, q_segment_ids is not None, scale)
    tp, sp = geo.nq * geo.bq, geo.nk * geo.bk
    args = [_pad(_pad(q, 1, tp), 3, dkp), _pad(_pad(k, 1, sp), 3, dkp), _pad(_pad(v, 1, sp), 3, dvp)]
    in_specs = [
        pl.BlockSpec((None, geo.bq, None, dkp), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sp, None, dkp), lambda i, bi, hi: (bi, 0, hi // r, 0)),
        pl.BlockSpec((None, sp, None, dvp), lambda i, bi, hi: (bi, 0, hi // r, 0)),
    ]
    if geo.segmented:
        in_specs += [
            pl.BlockSpec((None, geo.bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
        ] + [_tile_entry(lambda i, bi, hi: (bi, i))] * 2
    out, lse = pl.pallas_call(
        _with_segments(functools.partial(_forward_kernel, geo=geo), geo.segmented, 3),
        grid=(geo.nq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, geo.bq, None, dvp), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, geo.bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, dvp), q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
        compiler_params=_params(blocks, dkp, dvp),
        interpret=interpret,
        name="moela_flash_fwd",
    )(*args, *_segments(q_segment_ids, kv_segment_ids, geo, tp, sp, "kv"))
    return out[:, :t, :, :dv], lse[:, :, :t]


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

    ``out`` and ``lse`` may belong to a larger attention this block is part of (ring
    attention); ``d_lse`` (or None) is the log-sum-exp's cotangent."""
    schedule.validate(q, k, v, q_segment_ids, kv_segment_ids)
    blocks = blocks or BlockSizes()
    b, t, h, dk = q.shape
    s, g, dv = k.shape[1], k.shape[2], v.shape[3]
    r, dkp, dvp = h // g, pow2(dk, 16), pow2(dv, 16)
    segmented = q_segment_ids is not None
    delta = jnp.einsum("bthv,bthv->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32), jnp.inf)  # rows that see nothing: P = 0

    # dq: one program per (q tile, row, head)
    geo = _geometry(t, s, blocks.block_q_dq, blocks.block_k_dq, causal, segmented, scale)
    tp, sp = geo.nq * geo.bq, geo.nk * geo.bk
    q_spec = lambda d: pl.BlockSpec((None, geo.bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))  # noqa: E731
    kv_spec = lambda d: pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // r, 0))  # noqa: E731
    row_spec = pl.BlockSpec((None, None, geo.bq), lambda i, bi, hi: (bi, hi, i))
    in_specs = [q_spec(dkp), kv_spec(dkp), kv_spec(dvp), q_spec(dvp), row_spec, row_spec]
    if segmented:
        in_specs += [
            pl.BlockSpec((None, geo.bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
        ] + [_tile_entry(lambda i, bi, hi: (bi, i))] * 2
    dq = pl.pallas_call(
        _with_segments(functools.partial(_dq_kernel, geo=geo), segmented, 6),
        grid=(geo.nq, b, h),
        in_specs=in_specs,
        out_specs=q_spec(dkp),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, dkp), q.dtype),
        compiler_params=_params(blocks, dkp, dvp),
        interpret=interpret,
        name="moela_flash_dq",
    )(
        _pad(_pad(q, 1, tp), 3, dkp),
        _pad(_pad(k, 1, sp), 3, dkp),
        _pad(_pad(v, 1, sp), 3, dvp),
        _pad(_pad(d_out, 1, tp), 3, dvp),
        _pad(lse, 2, tp, jnp.inf),
        _pad(delta, 2, tp),
        *_segments(q_segment_ids, kv_segment_ids, geo, tp, sp, "kv"),
    )

    # dk/dv: one program per (KV tile, row, kv head), looping over its query heads
    geo = _geometry(t, s, blocks.block_q_dkv, blocks.block_k_dkv, causal, segmented, scale)
    tp, sp = geo.nq * geo.bq, geo.nk * geo.bk
    group_spec = lambda d: pl.BlockSpec((None, tp, r, d), lambda j, bi, gi: (bi, 0, gi, 0))  # noqa: E731
    tile_spec = lambda d: pl.BlockSpec((None, geo.bk, None, d), lambda j, bi, gi: (bi, j, gi, 0))  # noqa: E731
    rows_spec = pl.BlockSpec((None, r, tp), lambda j, bi, gi: (bi, gi, 0))
    in_specs = [group_spec(dkp), tile_spec(dkp), tile_spec(dvp), group_spec(dvp), rows_spec, rows_spec]
    if segmented:
        in_specs += [
            pl.BlockSpec((None, tp), lambda j, bi, gi: (bi, 0)),
            pl.BlockSpec((None, geo.bk), lambda j, bi, gi: (bi, j)),
        ]
        in_specs += [_tile_entry(lambda j, bi, gi: (bi, j))] * 2
    dk_p, dv_p = pl.pallas_call(
        _with_segments(functools.partial(_dkv_kernel, geo=geo, heads_per_kv=r), segmented, 6),
        grid=(geo.nk, b, g),
        in_specs=in_specs,
        out_specs=[tile_spec(dkp), tile_spec(dvp)],
        out_shape=[jax.ShapeDtypeStruct((b, sp, g, dkp), k.dtype), jax.ShapeDtypeStruct((b, sp, g, dvp), v.dtype)],
        compiler_params=_params(blocks, dkp, dvp),
        interpret=interpret,
        name="moela_flash_dkv",
    )(
        _pad(_pad(q, 1, tp), 3, dkp),
        _pad(_pad(k, 1, sp), 3, dkp),
        _pad(_pad(v, 1, sp), 3, dvp),
        _pad(_pad(d_out, 1, tp), 3, dvp),
        _pad(lse, 2, tp, jnp.inf),
        _pad(delta, 2, tp),
        *_segments(q_segment_ids, kv_segment_ids, geo, tp, sp, "q"),
    )
    return dq[:, :t, :, :dk], dk_p[:, :s, :, :dk], dv_p[:, :s, :, :dv]
