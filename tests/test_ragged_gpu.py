"""The GPU (Pallas Triton) ragged paged-attention kernel: under the Pallas interpreter against
per-sequence dense attention and the jnp reference, on random ragged batches whose unused
pages and page tails are NaN; and its lowering for ``cuda`` at a realistic serving shape
(exactly one Triton call per attention, the pool passed to it untouched, its Triton module
verified). What stays unproven here: Triton's compilation to machine code and the speed,
which need the device."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela.kernels import paged, ragged_gpu
from tests.paged_cases import BATCHES, GQA_SMALL, MLA_SMALL, dense_expected, make_case
from tests.test_flash_export import TRITON, export, kernel_calls, triton_modules_verify

# form -> (query heads, kv heads, row format): MLA and GQA at head ratios 1, 2, 4
FORMS = {
    "mla-r1": (1, 1, MLA_SMALL),
    "mla-r2": (2, 1, MLA_SMALL),
    "mla-r4": (4, 1, MLA_SMALL),
    "gqa-r1": (2, 2, GQA_SMALL),
    "gqa-r2": (4, 2, GQA_SMALL),
    "gqa-r4": (8, 2, GQA_SMALL),
}
# the lowering proof's serving shape (and the GPU-only serving-shape test's heads and rows)
T, S, PAGE, PAGES, LAYERS, MAX_PAGES = 256, 16, 16, 512, 2, 64
EXPORT_FORMS = {"mla": (16, 1, paged.RowFormat.mla(512, 64)), "gqa": (32, 8, paged.RowFormat.gqa(128))}
PAGE_SIZES = {"mla-r1": 4, "mla-r2": 8, "mla-r4": 16, "gqa-r1": 16, "gqa-r2": 8, "gqa-r4": 4}  # each meets both forms


def attend(case, backend="interpret_gpu", blocks=None, dtype=None):
    args = [jnp.asarray(a) for a in case.args()]
    if dtype is not None:
        args[:2] = [a.astype(dtype) for a in args[:2]]
    fn = functools.partial(paged.ragged_paged_attention, scale=case.scale, fmt=case.fmt, backend=backend, blocks=blocks)
    return jax.jit(fn)(*args)


def check(case, blocks=None, atol=1e-5):
    out = np.asarray(attend(case, blocks=blocks))
    assert out.shape == case.q.shape[:2] + (case.fmt.v_dim,) and out.dtype == case.q.dtype
    assert np.isfinite(out).all(), "a NaN row of an unused page or a page tail leaked into the output"
    np.testing.assert_allclose(out, dense_expected(case), atol=atol, rtol=atol)
    np.testing.assert_allclose(out, np.asarray(attend(case, backend="reference")), atol=atol, rtol=atol)
    real = int(case.cu_q_lens[case.num_seqs])
    assert np.all(out[real:] == 0), "padding tokens must return zeros"
    return out


def form_case(batch, form, page_size, **kwargs):
    heads, kv_heads, fmt = FORMS[form]
    return make_case(
        BATCHES[batch],
        heads=heads,
        kv_heads=kv_heads,
        fmt=fmt,
        page_size=page_size,
        pad_tokens=3,
        pad_seqs=2,
        seed=page_size,
        **kwargs,
    )


@pytest.mark.parametrize("form,page_size", [("mla-r4", 4), pytest.param("gqa-r2", 8, marks=pytest.mark.slow)])
def test_mixed_batch_matches_dense_and_reference(form, page_size):
    """Decode tokens, a chunk after cached context and whole prompts in one packed batch; with
    the default blocks (one step covers a table here) and with 16-position steps split over
    programs (merged by their log-sum-exps)."""
    case = form_case("mixed", form, page_size)
    check(case)
    blocks = ragged_gpu.BlockSizes(block_kv=16)
    geo = ragged_gpu._geometry(
        *case.q.shape[:2],
        case.pool.shape[3],
        len(case.kv_lens),
        case.pool.dtype,
        page_size,
        case.page_table.shape[1] * page_size,
        case.scale,
        case.fmt,
        blocks,
    )
    assert geo.splits == 3
    check(case, blocks)


def test_query_block_spans_sequences_and_padding():
    """One program's query block covers four decode sequences and the padding tokens; with
    num_seqs cut to 3 the last real sequence's token is padding too and returns zeros."""
    case = form_case("decode", "gqa-r4", 16)
    blocks = ragged_gpu.BlockSizes(block_q=8)
    first, last = ragged_gpu._block_spans(jnp.asarray(case.cu_q_lens), jnp.int32(case.num_seqs), 1, 8)
    assert (int(first[0]), int(last[0])) == (0, 3)
    check(case, blocks)
    case.num_seqs = 3
    assert np.all(check(case, blocks)[3:] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("form", sorted(FORMS))
def test_all_batches_forms_and_page_sizes(batch, form):
    check(form_case(batch, form, PAGE_SIZES[form]))


@pytest.mark.slow
def test_bfloat16_close_to_float32():
    case = form_case("mixed", "mla-r4", 8)
    out = attend(case, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, dense_expected(case), atol=6e-2)
    want = np.asarray(attend(case, backend="reference", dtype=jnp.bfloat16), np.float32)
    np.testing.assert_allclose(out, want, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt,page_size",
    [(paged.RowFormat.gqa(24), 5), (paged.RowFormat.mla(32, 8), 3)],
    ids=["gqa-d24-page5", "mla-40-page3"],
)
def test_row_pieces_not_multiples_of_16_and_odd_page_sizes(fmt, page_size):
    """Keys 24 / 40 wide: a padded 16-column piece with clamped column reads."""
    heads, kv_heads = (4, 2) if fmt.v_offset else (4, 1)
    check(
        make_case(
            BATCHES["mixed"], heads=heads, kv_heads=kv_heads, fmt=fmt, page_size=page_size, pad_tokens=3, pad_seqs=2
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "form,blocks",
    [
        ("mla-r4", ragged_gpu.BlockSizes(block_q=8, block_kv=16, block_h=2)),
        ("gqa-r4", ragged_gpu.BlockSizes(block_q=32, block_kv=64, block_h=1, kv_splits=1)),
        ("gqa-r2", ragged_gpu.BlockSizes(block_kv=16, kv_splits=3)),
    ],
    ids=["mla-head-chunks", "gqa-one-head-per-program-unsplit", "gqa-three-splits"],
)
def test_head_chunks_splits_and_block_sizes(form, blocks):
    check(form_case("mixed", form, 8), blocks)


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")


@on_gpu
@pytest.mark.parametrize(
    "form,page_size,dtype,splits",
    [
        ("mla-r4", 4, jnp.float32, None),
        ("gqa-r2", 8, jnp.float32, 1),
        ("gqa-r4", 16, jnp.bfloat16, None),
        ("mla-r2", 8, jnp.bfloat16, 1),
    ],
)
def test_compiled_kernel_matches_reference_on_gpu(form, page_size, dtype, splits):
    case = form_case("mixed", form, page_size)
    out = np.asarray(
        attend(case, backend="pallas", dtype=dtype, blocks=ragged_gpu.BlockSizes(kv_splits=splits)), np.float32
    )
    want = np.asarray(attend(case, backend="reference", dtype=dtype), np.float32)
    assert np.isfinite(out).all()
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, want, atol=atol, rtol=atol)
    assert np.all(out[int(case.cu_q_lens[case.num_seqs]) :] == 0)


@on_gpu
@pytest.mark.parametrize("form", sorted(EXPORT_FORMS))
def test_compiled_kernel_at_serving_shape_on_gpu(form):
    heads, kv_heads, fmt = EXPORT_FORMS[form]
    seqs = [(1, 1), (17, 1), (300, 1), (1000, 1), (513, 64), (1500, 100), (77, 77), (40, 30)]
    case = make_case(seqs, heads=heads, kv_heads=kv_heads, fmt=fmt, page_size=PAGE, pad_tokens=5, pad_seqs=2)
    out = np.asarray(attend(case, backend="pallas", dtype=jnp.bfloat16), np.float32)
    want = np.asarray(attend(case, backend="reference", dtype=jnp.bfloat16), np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=2e-2)
    assert np.all(out[int(case.cu_q_lens[case.num_seqs]) :] == 0)


def test_block_sizes_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        ragged_gpu.BlockSizes(block_q=3)
    with pytest.raises(ValueError, match=">= 16"):
        ragged_gpu.BlockSizes(block_kv=8)
    with pytest.raises(ValueError, match="kv_splits"):
        ragged_gpu.BlockSizes(kv_splits=0)


# ---------------------------------------------------------------- lowering proof


@pytest.mark.parametrize("splits", [None, 1], ids=["split", "unsplit"])
@pytest.mark.parametrize("form", sorted(EXPORT_FORMS))
def test_exports_one_verified_triton_call(form, splits):
    heads, kv_heads, fmt = EXPORT_FORMS[form]
    spec = jax.ShapeDtypeStruct
    args = (
        spec((T, heads, fmt.k_dim), jnp.bfloat16),
        spec((LAYERS, PAGES, PAGE, kv_heads, fmt.width), jnp.bfloat16),
        spec((S,), jnp.int32),
        spec((S, MAX_PAGES), jnp.int32),
        spec((S + 1,), jnp.int32),
        spec((), jnp.int32),
        spec((), jnp.int32),
    )

    def attention(q, pool, kv_lens, page_table, cu_q_lens, num_seqs, layer):
        return ragged_gpu.ragged_paged_attention(
            q,
            pool,
            kv_lens,
            page_table,
            cu_q_lens,
            num_seqs,
            layer,
            scale=fmt.k_dim**-0.5,
            fmt=fmt,
            blocks=ragged_gpu.BlockSizes(kv_splits=splits),
        )

    module = export(attention, "gpu", *args)
    assert kernel_calls(module, "gpu") == 1
    assert triton_modules_verify(module) == [True]
    assert "moela_ragged_paged_attention" in module
    # the pool (argument 1) goes to the kernel as is: no gather or slice of cache rows in XLA
    assert re.search(rf"custom_call @{re.escape(TRITON)}\([^)]*%arg1\)", module)
    assert not re.search(r"stablehlo\.(gather|dynamic_slice)\b[^\n]*-> tensor<[0-9x]*(bf16|f32)>", module)
    assert not re.search(rf"tensor<{T}x{MAX_PAGES * PAGE}x", module), "a [T, M·P] tensor: attention fell back to XLA"
