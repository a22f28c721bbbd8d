"""The ``xla`` backend (hand-written flash-style backward) against autodiff of the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela.kernels import reference, xla

CASES = [  # b, t, s, h, g, kd, vd, causal, segments
    (2, 7, 7, 4, 4, 16, 16, True, False),
    (2, 5, 9, 8, 2, 24, 16, True, True),  # GQA, causal offset 4, packed segments
    (1, 6, 6, 4, 1, 12, 8, False, True),  # MQA, no causal mask
    (2, 1, 8, 4, 2, 8, 8, True, False),  # one query (decode-like)
    (2, 11, 14, 4, 2, 8, 8, True, True),  # several causal query blocks when Q_BLOCK is small
]


def make(case, dtype=jnp.float32, seed=0):
    b, t, s, h, g, kd, vd, causal, segments = case
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, kd)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, g, kd)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, g, vd)), dtype)
    seg = None
    if segments:
        kv = np.sort(rng.integers(1, 4, (b, s)), axis=1).astype(np.int32)
        kv[:, -1] = 0  # trailing padding
        q_seg = kv[:, s - t :].copy()
        q_seg[0, 0] = 9  # a query of a segment with no keys: a fully masked row
        seg = (jnp.asarray(q_seg), jnp.asarray(kv))
    return q, k, v, causal, seg


def loss(fn, q, k, v, causal, seg, w_out, w_lse):
    kw = {} if seg is None else {"q_segment_ids": seg[0], "kv_segment_ids": seg[1]}
    out, lse = fn(q, k, v, scale=0.37, causal=causal, **kw)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)


@pytest.mark.parametrize("q_block", [128, 4])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_reference(case, q_block, monkeypatch):
    monkeypatch.setattr(xla, "Q_BLOCK", q_block)  # 4: causal cases run as several query blocks
    q, k, v, causal, seg = make(case)
    out_shape = q.shape[:3] + (v.shape[-1],)
    rng = np.random.default_rng(1)
    w_out = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2], q.shape[1])), jnp.float32)
    kw = {} if seg is None else {"q_segment_ids": seg[0], "kv_segment_ids": seg[1]}
    got, want = (
        xla.attention(q, k, v, scale=0.37, causal=causal, **kw),
        reference.attention(q, k, v, scale=0.37, causal=causal, **kw),
    )
    np.testing.assert_allclose(got[0], want[0], atol=2e-6)
    np.testing.assert_array_equal(np.isfinite(got[1]), np.isfinite(want[1]))
    np.testing.assert_allclose(
        np.where(np.isfinite(want[1]), got[1], 0), np.where(np.isfinite(want[1]), want[1], 0), atol=2e-6
    )
    grads = jax.grad(lambda *a: loss(xla.attention, *a, causal, seg, w_out, w_lse), argnums=(0, 1, 2))(q, k, v)
    expect = jax.grad(lambda *a: loss(reference.attention, *a, causal, seg, w_out, w_lse), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads, expect):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_causal_query_blocks_cover_exactly_the_visible_keys():
    assert xla._blocks(256, 256, causal=True) == [(0, 128, 128), (128, 256, 256)]
    assert xla._blocks(200, 300, causal=True) == [(0, 128, 228), (128, 200, 300)]
    assert xla._blocks(256, 256, causal=False) == [(0, 256, 256)]
    assert xla._blocks(100, 100, causal=True) == [(0, 100, 100)]


def test_bfloat16_gradients_keep_input_dtypes():
    q, k, v, causal, seg = make(CASES[1], jnp.bfloat16)
    w_out = jnp.ones(q.shape[:3] + (v.shape[-1],), jnp.float32)
    w_lse = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    grads = jax.grad(lambda *a: loss(xla.attention, *a, causal, seg, w_out, w_lse), argnums=(0, 1, 2))(q, k, v)
    expect = jax.grad(lambda *a: loss(reference.attention, *a, causal, seg, w_out, w_lse), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v))
    )
    for a, b in zip(grads, expect):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=5e-2, rtol=5e-2)
