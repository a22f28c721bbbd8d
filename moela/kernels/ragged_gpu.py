"""Ragged paged attention for GPU (Pallas Triton): the op of ``kernels.paged`` in one kernel.

Schedule. Programs run over (query block, kv head × head chunk, kv split). A query block is ``bt``
consecutive packed tokens; its rows are those tokens × ``rh`` query heads of one kv head
(token-major, so row r is token i·bt + r // rh), ``bt · rh`` rows in all, a power of two
>= 16 for ``tl.dot`` (the wrapper pads the heads of a group to a power of two and may split
them into chunks; padded heads have zero queries and are sliced off). The wrapper lays the
queries out as [G · chunks, T_pad · rh, K'] so a program's tile is one contiguous block.

Per program the wrapper has precomputed (in jnp) the first and last sequence its real tokens
belong to; the kernel walks those sequences in turn and, for each, its cache rows in steps of
``bk`` positions, only up to the last position any row of the block may see (kv_len - q_len +
the block's last token of that sequence). A step's rows are read straight from the pool
[L, N, P, G, W]: each position's page comes from the page table (a small vector gather of
table entries) and its row from that page (a gather of ``bk`` contiguous rows), so no cache
is copied in XLA and any page size works. Positions past the limit are clamped to the last
needed row before the table lookup, so entries beyond a sequence's pages are never read and
every address stays in range; they are then masked out of the scores *and* the values.

One online softmax (float32 max, sum and accumulator per row) runs over all the block's
sequences: a row's scores are masked to keys of its own sequence, at positions <= its
position (kv_len - q_len + index in the sequence) and < kv_len, so the steps of the other
sequences leave it unchanged. Rows that see nothing (padding tokens past cu_q_lens[num_seqs],
padded heads) end with a zero sum and return 0.

Splits (flash decoding). A decode batch has few query blocks (MLA: one kv head), too few
programs to fill the GPU, so ``kv_splits`` programs share each (block, head): split k takes
steps k, k + splits, ... of every sequence, and writes its normalised float32 part and
log-sum-exp; the wrapper merges the parts in jnp (weights exp(lse - max)). One split writes
the output directly.

Row pieces. Triton tiles must be powers of two, but a row's key and value spans need not be
(MLA: keys 512 + 64 = 576). Each span is cut into power-of-two pieces >= 16 (576 -> 512, 64;
48 -> 32, 16); a remainder under 16 becomes one 16-wide piece whose extra columns re-read the
span's last column (a clamped column gather). Scores sum one ``dot`` per key piece; the
queries carry the same pieces, zero-padded, so the extra columns add nothing, and extra value
columns are sliced off. A value piece equal to a key piece (MLA: the latent c_kv) reuses the
loaded tile. Dots take the input dtype (float32 in IEEE precision, not TF32) and accumulate in
float32. The default block sizes (``BlockSizes``) come from a small sweep on one H200.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moela.kernels.common import NEG_INF, is_pow2, pow2
from moela.kernels.paged_reference import RowFormat


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tokens per program (``block_q``), cache positions per step (``block_kv``, >= 16),
    query heads of a kv head per program (``block_h``), all powers of two; programs that share
    each query block's cache steps (``kv_splits``); launch parameters. ``None`` picks (rows =
    tokens × heads): heads = all of the group up to 64 rows; tokens = what fills 64 rows, but
    no more than the mean tokens per sequence slot T / S rounded down to a power of two (so a
    decode batch gets one token per program), and at least 16 rows; steps of 32 positions
    when the value pieces are >= 256 wide (MLA), else 64; splits until about 512 programs (at
    most 16, and the steps of the longest table); 8 warps from 32K accumulator elements
    (rows × value width), else 4. Picked from bf16 runs on one H200 (Triton 3.6, jax 0.11;
    single runs, ±20% between runs): decode of 128 sequences × 4096 positions, MLA 16 heads:
    16 rows, 4 warps, 4-8 splits 0.49-0.59 ms (1.0-1.2 TB/s of cache rows), against 1.6 ms
    unsplit at 32 rows; GQA 32/8 heads: 16 rows, 4 warps 0.64 ms (3.4 TB/s); prefill 4 × 2048:
    MLA 64 rows, 8 warps 121 TFLOP/s (48 with 4 warps), GQA 64 rows, 4 warps 149 TFLOP/s (83
    with 8); 64-position steps at 128 MLA rows overflow shared memory."""

    block_q: int | None = None
    block_kv: int | None = None
    block_h: int | None = None
    kv_splits: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_h"):
            value = getattr(self, name)
            if value is not None and not is_pow2(value):
                raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")
        if self.block_kv is not None and self.block_kv < 16:
            raise ValueError(f"BlockSizes.block_kv must be >= 16 (tl.dot), got {self.block_kv}")
        if self.kv_splits is not None and self.kv_splits < 1:
            raise ValueError(f"BlockSizes.kv_splits must be >= 1, got {self.kv_splits}")


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Columns [start, start + width) of a row, loaded as ``padded`` (a power of two >= 16)
    columns; ``at`` is where the piece sits in the wrapper's padded query / output rows."""

    start: int
    width: int
    padded: int
    at: int


def _pieces(start: int, width: int) -> tuple[_Piece, ...]:
    """Power-of-two pieces >= 16, largest first; a remainder under 16 is one padded piece."""
    pieces, at = [], 0
    for bit in range(width.bit_length() - 1, 3, -1):
        if (width >> bit) & 1:
            pieces.append(_Piece(start + at, 1 << bit, 1 << bit, at))
            at += 1 << bit
    if width % 16:
        pieces.append(_Piece(start + at, width % 16, 16, at))
    return tuple(pieces)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    bt: int  # query tokens per program
    rh: int  # query heads per program (of one kv head)
    chunks: int  # head chunks per kv head
    bk: int  # cache positions per step
    splits: int  # programs sharing a query block's steps (step j goes to split j % splits)
    page_size: int
    scale: float
    k_pieces: tuple[_Piece, ...]
    v_pieces: tuple[_Piece, ...]
    exact: bool  # float32 inputs: IEEE dots, not TF32

    @property
    def rows(self) -> int:
        return self.bt * self.rh


def _load_rows(pool_ref, layer, page_k, offset_k, head, piece: _Piece):
    """Rows [bk, padded] of ``piece`` at (layer, page, offset, head) from the pool."""
    if piece.width == piece.padded:
        return pool_ref[layer, page_k, offset_k, head, pl.ds(piece.start, piece.width)]
    cols = piece.start + jnp.minimum(jnp.arange(piece.padded, dtype=jnp.int32), piece.width - 1)
    return pool_ref[layer, page_k[:, None], offset_k[:, None], head, cols[None, :]]


def _dot(a, b, b_contract: int, precision):
    """a @ b (b_contract 0) or a @ bᵀ (1) accumulated in float32 (``pl.dot`` is gone after jax 0.11)."""
    return jax.lax.dot_general(
        a, b, (((1,), (b_contract,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _kernel(
    kv_lens_ref,
    page_table_ref,
    cu_q_lens_ref,
    first_ref,
    last_ref,
    scalars_ref,
    q_ref,
    pool_ref,
    o_ref,
    *lse_ref,
    geo: _Geometry,
):
    i, program_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head = jax.lax.div(program_head, geo.chunks)  # the kv head
    num_seqs, layer = scalars_ref[0], scalars_ref[1]
    block_start = i * geo.bt
    block_end = block_start + geo.bt
    row = jnp.arange(geo.rows, dtype=jnp.int32)
    tok_r = block_start + jax.lax.div(row, geo.rh)
    q_pieces = [q_ref[:, pl.ds(piece.at, piece.padded)] for piece in geo.k_pieces]  # [rows, padded] each
    precision = jax.lax.Precision.HIGHEST if geo.exact else None
    step_k = jnp.arange(geo.bk, dtype=jnp.int32)

    def sequence(s, carry):
        q_lo, q_hi, kv_len = cu_q_lens_ref[s], cu_q_lens_ref[s + 1], kv_lens_ref[s]
        in_seq_r = (tok_r >= q_lo) & (tok_r < q_hi)
        pos_r = kv_len - q_hi + tok_r  # kv_len - q_len + index in the sequence
        first_tok = jnp.maximum(q_lo, block_start)
        last_tok = jnp.minimum(q_hi, block_end) - 1
        limit = jnp.clip(kv_len - q_hi + last_tok + 1, 0, kv_len)  # positions any row of the block sees
        limit = limit * (last_tok >= first_tok).astype(jnp.int32)  # no select: keeps the loop bound i32
        steps = jax.lax.div(limit + geo.bk - 1, geo.bk)
        mine = jax.lax.div(jnp.maximum(steps - split + geo.splits - 1, 0), geo.splits)  # steps split, split + n, ..

        def step(jj, carry):
            m_r, l_r, accs = carry
            pos_k = (split + jj * geo.splits) * geo.bk + step_k
            valid_k = pos_k < limit
            safe_k = jnp.minimum(pos_k, limit - 1)  # past the limit: re-read the last needed row
            slot_k = jax.lax.div(safe_k, geo.page_size)
            page_k = page_table_ref[s, slot_k]
            offset_k = safe_k - slot_k * geo.page_size
            tiles = {}

            def rows_of(piece):
                key = (piece.start, piece.width)
                if key not in tiles:
                    tiles[key] = _load_rows(pool_ref, layer, page_k, offset_k, head, piece)
                return tiles[key]

            s_rk = None
            for q_piece, piece in zip(q_pieces, geo.k_pieces):
                part = _dot(q_piece, rows_of(piece), 1, precision)
                s_rk = part if s_rk is None else s_rk + part
            mask_rk = in_seq_r[:, None] & (pos_k[None, :] <= pos_r[:, None]) & valid_k[None, :]
            s_rk = jnp.where(mask_rk, s_rk * geo.scale, NEG_INF)
            m_next = jnp.maximum(m_r, jnp.max(s_rk, axis=1))
            p_rk = jnp.where(mask_rk, jnp.exp(s_rk - m_next[:, None]), 0.0)
            alpha_r = jnp.exp(m_r - m_next)
            new_accs = []
            for acc, piece in zip(accs, geo.v_pieces):
                v_kv = jnp.where(valid_k[:, None], rows_of(piece), 0)
                update = _dot(p_rk.astype(v_kv.dtype), v_kv, 0, precision)
                new_accs.append(acc * alpha_r[:, None] + update)
            return m_next, l_r * alpha_r + jnp.sum(p_rk, axis=1), tuple(new_accs)

        return jax.lax.fori_loop(0, mine, step, carry)

    init = (
        jnp.full((geo.rows,), NEG_INF, jnp.float32),
        jnp.zeros((geo.rows,), jnp.float32),
        tuple(jnp.zeros((geo.rows, piece.padded), jnp.float32) for piece in geo.v_pieces),
    )
    last = jnp.minimum(last_ref[i], num_seqs - 1)
    m_r, l_r, accs = jax.lax.fori_loop(first_ref[i], last + 1, sequence, init)
    inv_r = 1.0 / jnp.maximum(l_r, 1e-30)  # l = 0 (nothing seen): acc = 0, out 0
    for acc, piece in zip(accs, geo.v_pieces):
        o_ref[:, pl.ds(piece.at, piece.padded)] = (acc * inv_r[:, None]).astype(o_ref.dtype)
    if lse_ref:  # split: this part's log-sum-exp, NEG_INF where it saw nothing
        lse_ref[0][...] = jnp.where(l_r > 0, m_r + jnp.log(jnp.maximum(l_r, 1e-30)), NEG_INF)


def _geometry(t, h, g, seqs, dtype, page_size, max_pos, scale, fmt: RowFormat, blocks: BlockSizes) -> _Geometry:
    k_pieces, v_pieces = _pieces(0, fmt.k_dim), _pieces(fmt.v_offset, fmt.v_dim)
    wide = sum(piece.padded for piece in v_pieces) >= 256
    rp = pow2(h // g)
    rh = min(rp, blocks.block_h or 64)
    per_seq = 1 << (max(t // seqs, 1).bit_length() - 1)  # mean tokens per sequence slot, a power of two
    bt = blocks.block_q or max(1, min(64 // rh, per_seq))
    bt = max(min(bt, pow2(t)), 16 // rh if rh < 16 else 1)
    bk = min(blocks.block_kv or (32 if wide else 64), pow2(max_pos, 16))
    programs = -(-t // bt) * g * (rp // rh)
    splits = blocks.kv_splits or min(16, pow2(-(-512 // programs)))
    splits = min(splits, -(-max_pos // bk))
    return _Geometry(
        bt, rh, rp // rh, bk, splits, page_size, float(scale), k_pieces, v_pieces, jnp.dtype(dtype) == jnp.float32
    )


def _block_spans(cu_q_lens_s1, num_seqs, nq: int, bt: int):
    """Per query block: the first and last sequence its real tokens belong to ([0, -1]: none)."""
    s = cu_q_lens_s1.shape[0] - 1
    real_end = cu_q_lens_s1[jnp.minimum(num_seqs, s)]
    ends_s = jnp.where(jnp.arange(1, s + 1) > num_seqs, real_end, cu_q_lens_s1[1:])  # padding seqs: empty
    start_b = jnp.arange(nq, dtype=jnp.int32) * bt
    last_tok_b = jnp.minimum(start_b + bt, real_end) - 1
    first_b = jnp.minimum(jnp.searchsorted(ends_s, start_b, side="right"), s - 1).astype(jnp.int32)
    last_b = jnp.minimum(jnp.searchsorted(ends_s, last_tok_b, side="right"), s - 1).astype(jnp.int32)
    empty_b = start_b >= real_end
    return jnp.where(empty_b, 0, first_b), jnp.where(empty_b, -1, last_b)


def _spread(x_tgrd, pieces: tuple[_Piece, ...], base: int):
    """[..., d] columns [start - base, + width) of each piece at its padded place."""
    parts = []
    for piece in pieces:
        part = x_tgrd[..., piece.start - base : piece.start - base + piece.width]
        parts.append(jnp.pad(part, [(0, 0)] * (x_tgrd.ndim - 1) + [(0, piece.padded - piece.width)]))
    return jnp.concatenate(parts, axis=-1)


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
    """-> out [T, H, v_dim] in q's dtype. Arguments as ``kernels.paged.ragged_paged_attention``
    (num_seqs and layer int32 scalars); ``interpret`` runs the kernel in the Pallas interpreter."""
    blocks = blocks or BlockSizes()
    t, h, k = q_thk.shape
    _, _, page_size, g, _ = pool_lnpgw.shape
    s, m = page_table_sm.shape
    r = h // g
    geo = _geometry(t, h, g, s, pool_lnpgw.dtype, page_size, m * page_size, scale, fmt, blocks)
    nq = -(-t // geo.bt)
    tp, rp = nq * geo.bt, geo.rh * geo.chunks
    k_width = sum(piece.padded for piece in geo.k_pieces)
    v_width = sum(piece.padded for piece in geo.v_pieces)

    # queries -> [G · chunks, T_pad · rh, K'] (token-major rows), in the pool's dtype
    q_tgrk = q_thk.astype(pool_lnpgw.dtype).reshape(t, g, r, k)
    q_tgrk = jnp.pad(q_tgrk, [(0, tp - t), (0, 0), (0, rp - r), (0, 0)])
    q_tgrk = _spread(q_tgrk, geo.k_pieces, 0)
    q_gctk = q_tgrk.reshape(tp, g, geo.chunks, geo.rh, k_width).transpose(1, 2, 0, 3, 4)
    q_rows = q_gctk.reshape(g * geo.chunks, tp * geo.rh, k_width)

    first_b, last_b = _block_spans(cu_q_lens_s1, num_seqs, nq, geo.bt)
    scalars = jnp.stack([num_seqs, layer]).astype(jnp.int32)
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, c, sp, nd=x.ndim: (0,) * nd)  # noqa: E731
    metadata = (kv_lens_s, page_table_sm, cu_q_lens_s1, first_b, last_b, scalars)
    tile = lambda width: pl.BlockSpec((None, geo.rows, width), lambda i, c, sp: (c, i, 0))  # noqa: E731
    programs, rows = g * geo.chunks, tp * geo.rh
    if geo.splits == 1:
        out_specs = tile(v_width)
        out_shape = jax.ShapeDtypeStruct((programs, rows, v_width), q_thk.dtype)
    else:  # float32 parts and their log-sum-exps, merged below
        out_specs = [
            pl.BlockSpec((None, None, geo.rows, v_width), lambda i, c, sp: (sp, c, i, 0)),
            pl.BlockSpec((None, None, geo.rows), lambda i, c, sp: (sp, c, i)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((geo.splits, programs, rows, v_width), jnp.float32),
            jax.ShapeDtypeStruct((geo.splits, programs, rows), jnp.float32),
        ]
    warps = blocks.num_warps or (8 if geo.rows * v_width >= 32768 else 4)
    out_rows = pl.pallas_call(
        functools.partial(_kernel, geo=geo),
        grid=(nq, programs, geo.splits),
        in_specs=[whole(x) for x in metadata] + [tile(k_width), whole(pool_lnpgw)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="moela_ragged_paged_attention",
    )(*metadata, q_rows, pool_lnpgw)
    if geo.splits > 1:
        part_xcrv, lse_xcr = out_rows
        weight_xcr = jnp.exp(lse_xcr - jnp.max(lse_xcr, axis=0))  # parts that saw nothing: 0 (or all 1 and out 0)
        out_rows = jnp.einsum("xcr,xcrv->crv", weight_xcr, part_xcrv, precision="highest")
        out_rows = (out_rows / jnp.sum(weight_xcr, axis=0)[..., None]).astype(q_thk.dtype)

    out_tgrv = out_rows.reshape(g, geo.chunks, tp, geo.rh, v_width).transpose(2, 0, 1, 3, 4)
    out_tgrv = out_tgrv.reshape(tp, g, rp, v_width)
    parts = [out_tgrv[..., piece.at : piece.at + piece.width] for piece in geo.v_pieces]
    out_tgrv = jnp.concatenate(parts, axis=-1)[:t, :, :r]
    return out_tgrv.reshape(t, h, fmt.v_dim)
