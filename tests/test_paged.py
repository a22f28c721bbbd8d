"""The paged-attention reference and the row writer, against independent computations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moela.kernels import paged
from tests.paged_cases import BATCHES, GQA_SMALL, MLA_SMALL, dense_expected, make_case

FORMS = {"mla": (8, 1, MLA_SMALL), "gqa": (8, 2, GQA_SMALL), "mqa": (4, 1, GQA_SMALL), "mha": (4, 4, GQA_SMALL)}


@pytest.mark.parametrize(
    "form,batch",
    [
        pytest.param(f, b, marks=[] if (b == "mixed" and f in ("mla", "gqa")) else pytest.mark.slow)
        for f in sorted(FORMS)
        for b in sorted(BATCHES)
    ],
)
def test_reference_equals_dense_attention_per_sequence(batch, form):
    page_size = 4 if form in ("mla", "mqa") else 16
    heads, kv_heads, fmt = FORMS[form]
    case = make_case(
        BATCHES[batch],
        heads=heads,
        kv_heads=kv_heads,
        fmt=fmt,
        page_size=page_size,
        pad_tokens=3,
        pad_seqs=2,
        seed=page_size,
    )
    out = np.asarray(paged.ragged_paged_attention(*case.args(), scale=case.scale, fmt=fmt, backend="reference"))
    want = dense_expected(case)
    assert np.isfinite(out).all(), "a NaN row of an unused page leaked into the output"
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    real = int(case.cu_q_lens[case.num_seqs])
    assert np.all(out[real:] == 0), "padding tokens must return zeros"


@pytest.mark.parametrize(
    "form,batch,rows_per_step",
    [
        pytest.param(f, b, r, marks=[] if (b, f, r) == ("mixed", "mla", 64) else pytest.mark.slow)
        for f in ("mla", "gqa")
        for b in sorted(BATCHES)
        for r in (1 << 16, 64)
    ],
)
def test_xla_path_equals_dense_attention_per_sequence(form, batch, rows_per_step, monkeypatch):
    """The CPU path walks blocks of pages with an online softmax: with 64 rows per step every
    context spans several blocks (and a long chunk gets blocks of one page)."""
    from moela.kernels import paged_xla

    monkeypatch.setattr(paged_xla, "ROWS_PER_STEP", rows_per_step)
    heads, kv_heads, fmt = FORMS[form]
    case = make_case(
        BATCHES[batch], heads=heads, kv_heads=kv_heads, fmt=fmt, page_size=4, pad_tokens=3, pad_seqs=2, seed=7
    )
    out = np.asarray(paged.ragged_paged_attention(*case.args(), scale=case.scale, fmt=fmt, backend="xla"))
    assert np.isfinite(out).all(), "a NaN row of an unused page leaked into the output"
    np.testing.assert_allclose(out, dense_expected(case), atol=1e-5, rtol=1e-5)
    real = int(case.cu_q_lens[case.num_seqs])
    assert np.all(out[real:] == 0), "padding tokens must return zeros"


def test_xla_block_choice():
    from moela.kernels.paged_xla import pages_per_block

    assert pages_per_block(8, 16, 8) == 8  # a decode step over a small table: one block
    assert pages_per_block(8, 16, 128) == 16  # a long context: blocks of 16 pages, skipped past the longest
    assert pages_per_block(512, 16, 64) == 8  # a 512-token chunk: 512 x 128 rows per block
    assert pages_per_block(8192, 16, 4) == 1
    assert pages_per_block(8, 16, 5) == 8  # the table is padded to whole blocks


def test_reference_bfloat16_pool_close_to_float32():
    case = make_case(BATCHES["mixed"], heads=8, kv_heads=1, fmt=MLA_SMALL, page_size=8)
    want = dense_expected(case)
    q, pool = jnp.asarray(case.q, jnp.bfloat16), jnp.asarray(case.pool, jnp.bfloat16)
    out = paged.ragged_paged_attention(q, pool, *case.args()[2:], scale=case.scale, fmt=MLA_SMALL, backend="reference")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=6e-2)


def test_write_rows_matches_row_by_row_writer():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((3, 6, 4, 2, 5)).astype(np.float32)
    rows = rng.standard_normal((7, 2, 5)).astype(np.float32)
    slots = np.array([0, 5, 23, -1, 9, 24, 13], np.int32)  # -1 and 24 (= 6 pages x 4) are dropped
    got = np.asarray(paged.write_rows(jnp.asarray(pool), jnp.asarray(rows), jnp.asarray(slots), 2))
    want = write_rows_one_by_one(pool, rows, slots, 2)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, pool)


def test_bad_inputs_fail_with_one_clear_error():
    case = make_case(BATCHES["decode"], heads=6, kv_heads=4, fmt=GQA_SMALL, page_size=4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged.ragged_paged_attention(*case.args(), scale=1.0, fmt=GQA_SMALL, backend="reference")
    case = make_case(BATCHES["decode"], heads=4, kv_heads=1, fmt=MLA_SMALL, page_size=4)
    with pytest.raises(ValueError, match="row format"):
        paged.ragged_paged_attention(*case.args(), scale=1.0, fmt=GQA_SMALL, backend="reference")
    with pytest.raises(ValueError, match="unknown paged attention backend 'fast'; valid: auto, reference, xla"):
        paged.ragged_paged_attention(*case.args(), scale=1.0, fmt=MLA_SMALL, backend="fast")


def write_rows_one_by_one(pool, rows_tgw, slots_t, layer):
    """``write_rows`` one row at a time in Python: the reference."""
    pool = np.array(pool)
    p = pool.shape[2]
    for i, slot in enumerate(np.asarray(slots_t)):
        if 0 <= slot < pool.shape[1] * p:
            pool[int(layer), slot // p, slot % p] = np.asarray(rows_tgw[i], pool.dtype)
    return pool
