"""Pallas flash attention (TPU and GPU kernels, run by the Pallas interpreter) against the
pure-jnp reference: outputs, log-sum-exp and the gradients of both, over a grid of lengths,
head dims, head ratios, causal offsets, packed segments and dtypes; plus the model with
``runtime.attention=interpret`` against ``xla``.

The grid covers every value of every axis (T, S in {1, 7, 128, 300}; Dqk/Dv in {(64, 64),
(48, 32), (192, 128)}; Hq/Hkv in {(4, 4), (8, 2), (4, 1)}; causal on/off; segments on/off;
float32/bfloat16) and most pairs of values, in 14 cases rather than the 1152 of the full
product. Interpreted kernels cost seconds a call (compile), so the main suite runs three
cases per kernel and the ``slow`` step runs them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela import kernels
from moela.configs import load
from moela.configs.schema import RuntimeConfig
from moela.kernels import flash, flash_gpu, flash_tpu, reference
from moela.model.runtime import Runtime
from moela.model.transformer import init_model

SCALE = 0.125
F32, BF16 = jnp.float32, jnp.bfloat16

# T, S, (Dqk, Dv), (Hq, Hkv), causal, segments, dtype
CASES = [
    (300, 300, (64, 64), (8, 2), True, True, F32),
    (300, 128, (192, 128), (4, 4), True, False, BF16),  # T > S: the first 172 rows see nothing
    (7, 128, (192, 128), (8, 2), True, True, F32),  # causal offset, one partial block
    (1, 1, (64, 64), (4, 4), True, False, F32),
    (7, 7, (48, 32), (8, 2), True, True, BF16),
    (128, 128, (192, 128), (4, 1), False, True, F32),
    (1, 300, (192, 128), (8, 2), True, False, BF16),  # one decode-like query over 300 keys
    (7, 300, (64, 64), (4, 1), False, False, F32),
    (128, 300, (48, 32), (4, 4), True, True, F32),
    (300, 7, (48, 32), (4, 1), False, True, BF16),
    (128, 7, (64, 64), (4, 4), False, False, BF16),
    (300, 1, (48, 32), (8, 2), True, False, F32),
    (1, 128, (48, 32), (4, 1), True, True, BF16),
    (128, 1, (192, 128), (4, 1), True, True, F32),
]
FAST = CASES[:3]
TARGETS = ["tpu", "gpu"]
# small TPU blocks so the 300-long cases run 3 x 3 block grids (skipped, masked and clean blocks)
SMALL = flash_tpu.BlockSizes(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128, block_k_dkv=128)
BLOCKS = {"tpu": SMALL, "gpu": None}


def case_id(case):
    t, s, (dk, dv), (h, g), causal, seg, dtype = case
    mask = ("causal" if causal else "full") + ("-seg" if seg else "")
    return f"T{t}-S{s}-D{dk}x{dv}-H{h}x{g}-{mask}-{dtype.__name__}"


def packed_segments(rng, b, n, docs=3):
    """Sorted document ids [b, n] with ``docs`` random cut points per row (some documents empty)."""
    cuts = np.sort(rng.integers(0, n + 1, (b, docs)), axis=1)
    return jnp.asarray((np.arange(n)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def inputs(case, b=2, seed=0):
    t, s, (dk, dv), (h, g), causal, seg, dtype = case
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q, k, v = normal(b, t, h, dk), normal(b, s, g, dk), normal(b, s, g, dv)
    q_seg = kv_seg = None
    if seg:  # queries are the last t of the s positions; with t > s the ids of the earlier rows are new ones
        ids = packed_segments(rng, b, max(s, t))
        kv_seg, q_seg = ids[:, -s:], ids[:, -t:]
    d_out = normal(b, t, h, dv)
    d_lse = jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32)
    return q, k, v, q_seg, kv_seg, d_out, d_lse


def with_gradients(attention, q, k, v, d_out, d_lse):
    """(out, lse, dq, dk, dv) with cotangents on both outputs (d_lse zeroed where lse is -inf)."""
    (out, lse), vjp = jax.vjp(attention, q, k, v)
    d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
    return (out, lse, *vjp((d_out, d_lse)))


def check(case, got, want):
    """float32: atol 2e-5; bfloat16: atol 2e-2 (and rtol 2e-2 for gradients, which sum many rows)."""
    dtype = case[-1]
    atol, rtol = (2e-5, 0.0) if dtype == F32 else (2e-2, 2e-2)
    names = ("out", "lse", "dq", "dk", "dv")
    want_lse = np.asarray(want[1])
    np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), np.isfinite(want_lse), err_msg="rows seeing nothing")
    for name, g_, w_ in zip(names, got, want):
        g_, w_ = np.asarray(g_, np.float32), np.asarray(w_, np.float32)
        if name == "lse":
            g_, w_ = np.where(np.isfinite(w_), g_, 0), np.where(np.isfinite(w_), w_, 0)
            np.testing.assert_allclose(g_, w_, atol=max(atol, 2e-5), err_msg=name)  # lse is float32 throughout
        else:
            np.testing.assert_allclose(g_, w_, atol=atol, rtol=rtol if name != "out" else 0.0, err_msg=name)
    assert got[0].dtype == case[-1] and got[2].dtype == case[-1]


def run_case(case, target, interpret=True):
    t, s, dims, heads, causal, seg, dtype = case
    q, k, v, q_seg, kv_seg, d_out, d_lse = inputs(case)
    kernel = lambda q, k, v: flash.attention(
        q,
        k,
        v,
        scale=SCALE,
        causal=causal,
        q_segment_ids=q_seg,  # noqa: E731
        kv_segment_ids=kv_seg,
        target=target,
        interpret=interpret,
        blocks=BLOCKS[target],
    )
    # the reference runs in float32 on the same (possibly bfloat16-rounded) inputs
    ref = lambda q, k, v: reference.attention(
        q,
        k,
        v,
        scale=SCALE,
        causal=causal,
        q_segment_ids=q_seg,  # noqa: E731
        kv_segment_ids=kv_seg,
    )
    up = lambda x: x.astype(F32)  # noqa: E731
    got = jax.jit(lambda *a: with_gradients(kernel, *a))(q, k, v, d_out, d_lse)
    # IEEE float32 for the reference: on a GPU XLA's default float32 matmul is TF32 (~1e-3 off)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda *a: with_gradients(ref, *map(up, a[:3]), up(a[3]), a[4]))(q, k, v, d_out, d_lse)
    check(case, got, want)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", FAST, ids=case_id)
def test_kernel_matches_reference(case, target):
    run_case(case, target)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compiled_gpu_kernel_matches_reference(case):
    run_case(case, "gpu", interpret=False)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES[len(FAST) :], ids=case_id)
def test_kernel_matches_reference_sweep(case, target):
    run_case(case, target)


@pytest.mark.parametrize("impl", ["interpret", "interpret_gpu"])
def test_attention_bwd_blocks_of_a_larger_attention(impl):
    """``kernels.attention_bwd`` per half of the keys, given the whole attention's out and lse
    (as ring attention calls it), returns each half's exact share: the dq add up, dk/dv join."""
    case = (16, 256, (48, 32), (4, 2), True, True, F32)
    q, k, v, q_seg, kv_seg, d_out, d_lse = inputs(case, b=1, seed=3)
    kw = dict(scale=SCALE, q_segment_ids=q_seg, d_lse_bht=d_lse)
    out, lse = reference.attention(q, k, v, scale=SCALE, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    whole = kernels.attention_bwd(q, k, v, out, lse, d_out, causal=True, kv_segment_ids=kv_seg, backend="xla", **kw)
    # queries are positions 240..255: they see all of keys 0..127 (no causal mask) and keys
    # 128..255 causally with offset 112, exactly as the whole attention does
    first = kernels.attention_bwd(
        q, k[:, :128], v[:, :128], out, lse, d_out, causal=False, kv_segment_ids=kv_seg[:, :128], backend=impl, **kw
    )
    second = kernels.attention_bwd(
        q, k[:, 128:], v[:, 128:], out, lse, d_out, causal=True, kv_segment_ids=kv_seg[:, 128:], backend=impl, **kw
    )
    np.testing.assert_allclose(first[0] + second[0], whole[0], atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([first[1], second[1]], 1), whole[1], atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate([first[2], second[2]], 1), whole[2], atol=2e-5)


DOCS = jnp.asarray([[0] * 200 + [1] * 300 + [2] * 12], jnp.int32)  # a packed row of three documents


def test_block_schedules_skip_other_documents():
    """Both kernels visit, per block, only the blocks of its own documents at or below the
    diagonal: TPU tables (with 128-row blocks) and GPU spans (128 x 64 tiles)."""
    geo = flash_tpu._Geometry(512, 512, 128, 128, causal=True, segmented=True, scale=SCALE)
    fwd = flash_tpu._Tables.build(DOCS, DOCS, geo, 1, over="kv")
    # q block 0 (rows 0-127, doc 0): kv block 0; block 1 (doc 0/1): 0-1; block 2 (doc 1): 1-2; block 3 (docs 1-2): 1-3
    np.testing.assert_array_equal(fwd.first[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(fwd.last[0], [0, 1, 2, 3])
    bwd = flash_tpu._Tables.build(DOCS, DOCS, geo, 1, over="q")
    np.testing.assert_array_equal(bwd.first[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(bwd.last[0], [1, 3, 3, 3])
    geo = flash_gpu._geometry(512, 512, 128, 64, True, True, SCALE)
    _, _, first, last = flash_gpu._segments(DOCS, DOCS, geo, 512, 512, "kv")
    # q tile 2 (rows 256-383, doc 1) starts at KV tile 3 (keys 192-255 hold doc 1 from 200)
    np.testing.assert_array_equal(first[0], [0, 0, 3, 3])
    np.testing.assert_array_equal(last[0], [1, 3, 5, 7])


@pytest.mark.parametrize("target", TARGETS)
def test_long_documents_are_exact_with_skipping(target):
    case = (512, 512, (64, 64), (4, 2), True, False, F32)
    q, k, v, _, _, d_out, d_lse = inputs(case, b=1, seed=5)
    kernel = lambda q, k, v: flash.attention(
        q,
        k,
        v,
        scale=SCALE,
        q_segment_ids=DOCS,
        kv_segment_ids=DOCS,  # noqa: E731
        target=target,
        interpret=True,
        blocks=BLOCKS[target],
    )
    ref = lambda q, k, v: reference.attention(q, k, v, scale=SCALE, q_segment_ids=DOCS, kv_segment_ids=DOCS)  # noqa: E731
    got = jax.jit(lambda *a: with_gradients(kernel, *a))(q, k, v, d_out, d_lse)
    check(case, got, jax.jit(lambda *a: with_gradients(ref, *a))(q, k, v, d_out, d_lse))


def test_bad_inputs_are_named():
    q = jnp.zeros((1, 8, 6, 16))
    k = v = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash.attention(q, k, v, scale=1.0, target="tpu", interpret=True)
    with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
        flash.attention(q[:, :, :4], k, v, scale=1.0, q_segment_ids=jnp.zeros((1, 8), jnp.int32), target="tpu")
    with pytest.raises(ValueError, match="unknown flash-attention target"):
        flash.attention(q[:, :, :4], k, v, scale=1.0, target="cpu")
    with pytest.raises(ValueError, match="needs a TPU or GPU"):
        kernels.attention(q[:, :, :4], k, v, scale=1.0, backend="pallas")
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_tpu.BlockSizes(block_q=100)


def test_auto_is_xla_on_cpu_and_blocks_per_generation():
    assert kernels.ATTENTION.resolve("auto") == "xla"
    assert flash_tpu.BlockSizes.for_generation("TPU v5 lite").block_q == 256
    assert flash_tpu.BlockSizes.for_generation("TPU v5p") == flash_tpu.BlockSizes()


def test_model_forward_backward_interpret_equals_xla():
    """A tiny MLA + MoE model on packed rows: logits and every parameter gradient agree."""
    from flax import nnx

    def loss_and_grads(backend):
        cfg = load("tiny").model
        model = init_model(cfg)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
        seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24], jnp.int32)

        def loss(model):
            logits, _ = model(tokens, segment_ids_bt=seg, rt=Runtime(RuntimeConfig(attention=backend)))
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

        return nnx.jit(nnx.value_and_grad(loss))(model)

    (loss_x, grads_x), (loss_i, grads_i) = loss_and_grads("xla"), loss_and_grads("interpret")
    np.testing.assert_allclose(loss_i, loss_x, atol=1e-5)
    flat_x, flat_i = jax.tree.leaves(nnx.state(grads_x)), jax.tree.leaves(nnx.state(grads_i))
    assert len(flat_x) == len(flat_i) > 10
    for gx, gi in zip(flat_x, flat_i):
        np.testing.assert_allclose(gi, gx, atol=2e-5)
