"""The TPU ragged paged-attention kernel (``kernels.ragged_tpu``) under the TPU interpreter,
against the jnp reference and a per-sequence dense attention; and its lowering for ``tpu`` at
serving shapes (DeepSeek-V3 MLA rows, GQA with head dim 128).

Every case has NaN in all pool rows no sequence owns (tails of last pages, spare pages) and
page-table entries past a sequence's pages that point at NaN pages or out of the pool, so a
kernel that reads or DMAs what it should not shows NaN. Interpreted calls cost ~2-3 s of
compilation each: the fast tests are few, the sweep is ``slow``.
"""

from __future__ import annotations

import base64
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import tpu as mosaic
from jax._src.lib.mlir import ir, passmanager

from moela.kernels import paged, ragged_tpu
from moela.kernels.paged import RowFormat
from tests.paged_cases import BATCHES, GQA_SMALL, MLA_SMALL, dense_expected, make_case
from tests.test_flash_export import export, kernel_calls, mosaic_modules_verify

# form -> (query heads, kv heads, row format); GQA head ratios 1, 2, 4
FORMS = {"mla": (8, 1, MLA_SMALL), "gqa1": (2, 2, GQA_SMALL), "gqa2": (4, 2, GQA_SMALL), "gqa4": (8, 2, GQA_SMALL)}


def run(case, backend, blocks=None, dtype=None):
    q, pool = case.q, case.pool
    if dtype is not None:
        q, pool = jnp.asarray(q, dtype), jnp.asarray(pool, dtype)
    fn = functools.partial(paged.ragged_paged_attention, scale=case.scale, fmt=case.fmt, backend=backend, blocks=blocks)
    return jax.jit(fn)(q, pool, *case.args()[2:])


def check(case, blocks=None, dense=False):
    """Kernel == reference (and == per-sequence dense attention); finite; padding tokens zero."""
    out = np.asarray(run(case, "interpret", blocks))
    assert out.shape == (*case.q.shape[:2], case.fmt.v_dim) and out.dtype == case.q.dtype
    assert np.isfinite(out).all(), "a NaN row of an unused page (or stale buffer) leaked into the output"
    np.testing.assert_allclose(out, np.asarray(run(case, "reference")), atol=1e-5, rtol=1e-5)
    if dense:
        np.testing.assert_allclose(out, dense_expected(case), atol=1e-5, rtol=1e-5)
    real = int(case.cu_q_lens[case.num_seqs])
    assert np.all(out[real:] == 0), "padding tokens must return zeros"
    return out


def test_blocks_span_sequences_and_sequences_span_blocks():
    """MLA, page size 4, query blocks of 8 tokens: blocks 0 and 1 hold two and three sequences,
    the 8- and 13-token sequences cross block boundaries, an empty sequence (q_len 0) sits in
    the middle, the last block is all padding, and two padding sequences follow."""
    seqs = [(9, 1), (24, 8), (6, 0), (7, 7), (31, 13)]
    case = make_case(seqs, heads=8, kv_heads=1, fmt=MLA_SMALL, page_size=4, pad_tokens=5, pad_seqs=2, seed=1)
    blocks = ragged_tpu.BlockSizes(q_tokens=8, pages_per_block=2)
    cu = case.cu_q_lens
    assert cu[1] < 8 < cu[2] and cu[4] < 24 < cu[5] and case.q.shape[0] > 32
    check(case, blocks, dense=True)


def test_gqa_decode_head_ratio_4_page_8():
    case = make_case(BATCHES["decode"], heads=8, kv_heads=2, fmt=GQA_SMALL, page_size=8, pad_tokens=2, pad_seqs=1)
    check(case, ragged_tpu.BlockSizes(q_tokens=8, pages_per_block=2))


def test_gqa_prefill_head_ratio_1_page_16_default_blocks():
    case = make_case(BATCHES["prefill"], heads=2, kv_heads=2, fmt=GQA_SMALL, page_size=16, pad_tokens=3, seed=2)
    check(case)


# with the fast tests (mixed-mla-4, decode-gqa4-8, prefill-gqa1-16) and the bfloat16 ones (page
# size 8): every batch with two or more forms, every form with two or more page sizes
SWEEP = [
    ("decode", "mla", 16),
    ("decode", "gqa2", 4),
    ("prefill", "gqa4", 4),
    ("mixed", "gqa1", 8),
    ("mixed", "gqa2", 16),
]


@pytest.mark.slow
@pytest.mark.parametrize("batch,form,page_size", SWEEP)
def test_sweep_batches_forms_page_sizes(batch, form, page_size):
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
    check(case, ragged_tpu.BlockSizes(q_tokens=16, pages_per_block=3))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["mla", "gqa2"])
def test_bfloat16_matches_reference(form):
    heads, kv_heads, fmt = FORMS[form]
    case = make_case(BATCHES["mixed"], heads=heads, kv_heads=kv_heads, fmt=fmt, page_size=8, pad_tokens=3)
    out = run(case, "interpret", ragged_tpu.BlockSizes(q_tokens=8, pages_per_block=2), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(run(case, "reference", dtype=jnp.bfloat16), np.float32), atol=2e-2)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="multiple of 8"):
        ragged_tpu.BlockSizes(q_tokens=12)
    with pytest.raises(ValueError, match="pages_per_block"):
        ragged_tpu.BlockSizes(pages_per_block=0)


# ---------------------------------------------------------------- lowering at serving shapes

T, S, PAGE, PAGES, LAYERS = 256, 16, 16, 512, 2
SERVING = {
    "mla": (16, 1, RowFormat.mla(512, 64)),  # DeepSeek-V3: rows [c_kv 512 | k_pe 64], W = 576
    "gqa": (32, 8, RowFormat.gqa(128)),
}  # W = 256


def mosaic_texts(module: str) -> list[str]:
    """Each tpu_custom_call's Mosaic kernel body as MLIR text."""
    ctx = jax_mlir.make_ir_context()
    mosaic.register_dialect(ctx)
    texts = []
    with ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        for body in re.findall(r"\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22", module):
            kernel = ir.Module.parse(base64.b64decode(body))
            passmanager.PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(kernel.operation)
            texts.append(str(kernel))
    return texts


@pytest.mark.parametrize("form", sorted(SERVING))
def test_export_lowers_for_tpu(form):
    heads, kv_heads, fmt = SERVING[form]
    spec = jax.ShapeDtypeStruct
    args = (
        spec((T, heads, fmt.k_dim), jnp.bfloat16),
        spec((LAYERS, PAGES, PAGE, kv_heads, fmt.width), jnp.bfloat16),
        spec((S,), jnp.int32),
        spec((S, PAGES // S), jnp.int32),
        spec((S + 1,), jnp.int32),
        spec((), jnp.int32),
        spec((), jnp.int32),
    )

    def attend(*args):
        return ragged_tpu.ragged_paged_attention(*args, scale=fmt.k_dim**-0.5, fmt=fmt)

    module = export(attend, "tpu", *args)
    assert kernel_calls(module, "tpu") == 1, module[:2000]
    assert "moela_ragged_paged_attention" in module
    assert not re.search(rf"tensor<{LAYERS}x{PAGES}x{PAGE}x[\dx]*f32>", module), "the pool was converted to float32"
    assert mosaic_modules_verify(module) == [True]
    (kernel,) = mosaic_texts(module)
    assert "tpu.enqueue_dma" in kernel and "tpu.wait_dma" in kernel
