"""``kernels.reference.attention`` (and ``kernels.attention``) against a naive float64 numpy loop.

The oracle below is written from the definition, independently of the jnp code: for every
batch row, query head and query position it lists the visible keys (causal with offset S-T:
query t sits at absolute position t + S - T; with segment ids only keys of the same segment),
takes a softmax over them and returns the weighted values and the log-sum-exp. A row with
no visible key gives zeros and log-sum-exp -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela import kernels
from moela.kernels import reference

# One compiled program per shape is much cheaper on CPU than dispatching every op eagerly;
# ``test_jit_matches_eager`` covers the eager path.
ref_attention = jax.jit(reference.attention, static_argnames=("scale", "causal"))
dispatch_attention = jax.jit(kernels.attention, static_argnames=("scale", "causal", "backend"))


def naive_attention(q, k, v, *, scale, causal, q_seg=None, kv_seg=None):
    """q [B,T,H,K], k [B,S,G,K], v [B,S,G,V] -> out [B,T,H,V], lse [B,H,T], all float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, _ = q.shape
    s, g = k.shape[1], k.shape[2]
    per_kv = h // g
    out = np.zeros((b, t, h, v.shape[-1]))
    lse = np.full((b, h, t), -np.inf)
    for bi in range(b):
        for hi in range(h):
            gi = hi // per_kv  # query head hi reads kv head hi // (H/G)
            for ti in range(t):
                pos = ti + s - t
                keys = [
                    si
                    for si in range(s)
                    if (not causal or si <= pos) and (q_seg is None or q_seg[bi, ti] == kv_seg[bi, si])
                ]
                if not keys:
                    continue
                logits = np.array([scale * np.dot(q[bi, ti, hi], k[bi, si, gi]) for si in keys])
                mx = logits.max()
                w = np.exp(logits - mx)
                lse[bi, hi, ti] = mx + np.log(w.sum())
                w /= w.sum()
                out[bi, ti, hi] = sum(wj * v[bi, sj, gi] for wj, sj in zip(w, keys))
    return out, lse


def _inputs(rng, b, t, s, h, g, kd, vd, dtype=np.float32):
    q = rng.standard_normal((b, t, h, kd)).astype(dtype)
    k = rng.standard_normal((b, s, g, kd)).astype(dtype)
    v = rng.standard_normal((b, s, g, vd)).astype(dtype)
    return q, k, v


def _packed_segments(rng, b, s, max_segments=3, pad=True):
    """Sorted (packed-document) segment ids [B, S] in 1..n, optionally with trailing 0 padding."""
    seg = np.zeros((b, s), np.int32)
    for bi in range(b):
        n_pad = int(rng.integers(0, s // 4 + 1)) if pad else 0
        cuts = np.sort(rng.choice(np.arange(1, s - n_pad), size=min(max_segments - 1, s - n_pad - 1), replace=False))
        ids = np.zeros(s - n_pad, np.int32)
        for c in cuts:
            ids[c:] += 1
        seg[bi, : s - n_pad] = ids + 1
    return seg


def _check(out, lse, ref_out, ref_lse, rtol, atol):
    out = np.asarray(out, np.float64)
    lse = np.asarray(lse, np.float64)
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_array_equal(lse[~finite], ref_lse[~finite])  # -inf exactly
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=rtol, atol=atol)


# (B, T, S, H, G, K, V)
SHAPES = [
    pytest.param((2, 7, 7, 4, 4, 16, 16), id="mha-T==S"),
    pytest.param((2, 5, 11, 8, 2, 24, 16), id="gqa-T<S-K!=V"),
    pytest.param((1, 6, 6, 4, 1, 8, 12), id="mqa-T==S"),
    pytest.param((2, 1, 9, 8, 2, 16, 16), id="gqa-decode-T=1"),
    pytest.param((1, 4, 13, 6, 1, 24, 16), id="mqa-T<S-K!=V"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive(shape, causal):
    b, t, s, h, g, kd, vd = shape
    rng = np.random.default_rng([*shape, causal])
    q, k, v = _inputs(rng, b, t, s, h, g, kd, vd)
    scale = 0.7 / np.sqrt(kd)
    out, lse = ref_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=scale, causal=causal)
    assert out.shape == (b, t, h, vd) and out.dtype == jnp.float32
    assert lse.shape == (b, h, t) and lse.dtype == jnp.float32
    ref_out, ref_lse = naive_attention(q, k, v, scale=scale, causal=causal)
    assert np.all(np.isfinite(ref_lse))
    _check(out, lse, ref_out, ref_lse, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_packed_segments(shape, causal):
    """Packed sequences: q segment ids are the last T of the kv segment ids."""
    b, t, s, h, g, kd, vd = shape
    rng = np.random.default_rng([*shape, causal, 1])
    q, k, v = _inputs(rng, b, t, s, h, g, kd, vd)
    kv_seg = _packed_segments(rng, b, s)
    q_seg = kv_seg[:, s - t :]
    scale = 1.0 / np.sqrt(kd)
    out, lse = ref_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        scale=scale,
        causal=causal,
        q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg),
    )
    ref_out, ref_lse = naive_attention(q, k, v, scale=scale, causal=causal, q_seg=q_seg, kv_seg=kv_seg)
    _check(out, lse, ref_out, ref_lse, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_naive_random_segments(causal):
    """Unsorted, independent q/kv segment ids: some rows see nothing (zeros, lse -inf)."""
    b, t, s, h, g, kd, vd = 3, 6, 10, 4, 2, 24, 16
    rng = np.random.default_rng(11 + causal)
    q, k, v = _inputs(rng, b, t, s, h, g, kd, vd)
    q_seg = rng.integers(0, 4, (b, t)).astype(np.int32)
    kv_seg = rng.integers(0, 3, (b, s)).astype(np.int32)
    q_seg[0, 0] = 3  # absent from kv: a fully masked row in every case
    out, lse = ref_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        scale=0.25,
        causal=causal,
        q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg),
    )
    ref_out, ref_lse = naive_attention(q, k, v, scale=0.25, causal=causal, q_seg=q_seg, kv_seg=kv_seg)
    assert np.any(~np.isfinite(ref_lse)) and np.any(np.isfinite(ref_lse))
    _check(out, lse, ref_out, ref_lse, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_dispatch_matches_naive(impl):
    b, t, s, h, g, kd, vd = 2, 5, 9, 8, 2, 24, 16
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, b, t, s, h, g, kd, vd)
    kv_seg = _packed_segments(rng, b, s)
    q_seg = kv_seg[:, s - t :]
    out, lse = dispatch_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        scale=0.3,
        causal=True,
        q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg),
        backend=impl,
    )
    ref_out, ref_lse = naive_attention(q, k, v, scale=0.3, causal=True, q_seg=q_seg, kv_seg=kv_seg)
    _check(out, lse, ref_out, ref_lse, rtol=1e-5, atol=2e-6)
    out_nc, lse_nc = dispatch_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3, causal=False, backend=impl
    )
    ref_out, ref_lse = naive_attention(q, k, v, scale=0.3, causal=False)
    _check(out_nc, lse_nc, ref_out, ref_lse, rtol=1e-5, atol=2e-6)


def test_unknown_impl_raises():
    q = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(
        ValueError,
        match="unknown attention backend 'nope'; valid: auto, xla, reference, pallas, interpret, interpret_gpu",
    ):
        kernels.attention(q, q, q, scale=1.0, backend="nope")


def test_jit_matches_eager():
    b, t, s, h, g, kd, vd = 2, 4, 8, 4, 2, 16, 8
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(a) for a in _inputs(rng, b, t, s, h, g, kd, vd))
    seg = jnp.asarray(_packed_segments(rng, b, s))
    fn = lambda q, k, v, qs, ks: reference.attention(q, k, v, scale=0.5, q_segment_ids=qs, kv_segment_ids=ks)
    eager = fn(q, k, v, seg[:, s - t :], seg)
    jitted = jax.jit(fn)(q, k, v, seg[:, s - t :], seg)
    for a, bb in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(bb), rtol=1e-6, atol=1e-6)


def test_fully_masked_rows_are_zero():
    """causal=False with query segment ids absent from the kv ids: out 0, lse -inf, finite grads."""
    b, t, s, h, g, kd, vd = 2, 4, 6, 4, 2, 8, 8
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(a) for a in _inputs(rng, b, t, s, h, g, kd, vd))
    q_seg = jnp.asarray([[1, 7, 2, 7], [7, 7, 7, 7]], jnp.int32)
    kv_seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 2, 3, 4, 5, 6]], jnp.int32)
    out, lse = ref_attention(q, k, v, scale=0.5, causal=False, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    dead = np.asarray(q_seg) == 7  # [B, T]
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[dead] == 0.0)
    assert np.all(np.isneginf(lse.transpose(0, 2, 1)[dead]))
    assert np.all(np.abs(out[~dead]).sum(-1) > 0)
    assert np.all(np.isfinite(lse.transpose(0, 2, 1)[~dead]))

    def loss(q, k, v):
        o, _ = ref_attention(q, k, v, scale=0.5, causal=False, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
        return jnp.sum(o * o)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for gr in grads:
        assert np.all(np.isfinite(np.asarray(gr)))
    assert np.all(np.asarray(grads[0])[dead] == 0.0)  # a dead query gets no gradient


def test_causal_offset_sees_prefix():
    """With T < S the first query (absolute position S-T) sees exactly keys 0..S-T."""
    t, s = 3, 8
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(a) for a in _inputs(rng, 1, t, s, 2, 2, 8, 8))
    out, _ = ref_attention(q, k, v, scale=0.4, causal=True)
    v_future = v.at[:, s - t + 1 :].set(100.0)  # keys after the first query's position
    out2, _ = ref_attention(q, k, v_future, scale=0.4, causal=True)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(out2[:, 0]))
    assert not np.allclose(np.asarray(out[:, 1:]), np.asarray(out2[:, 1:]))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_segment_isolation(causal):
    """Changing q/k/v of one packed segment leaves every other segment's outputs unchanged."""
    b, t, h, g, kd, vd = 2, 10, 4, 2, 16, 8
    rng = np.random.default_rng(21 + causal)
    q, k, v = _inputs(rng, b, t, t, h, g, kd, vd)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
    seg_j = jnp.asarray(seg)

    def run(q, k, v):
        return ref_attention(
            jnp.asarray(q),
            jnp.asarray(k),
            jnp.asarray(v),
            scale=0.3,
            causal=causal,
            q_segment_ids=seg_j,
            kv_segment_ids=seg_j,
        )

    out, lse = (np.asarray(a) for a in run(q, k, v))
    for target in (1, 2):
        sel = seg == target
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[sel] = rng.standard_normal(q2[sel].shape) * 3
        k2[sel] = rng.standard_normal(k2[sel].shape) * 3
        v2[sel] = rng.standard_normal(v2[sel].shape) * 3
        out2, lse2 = (np.asarray(a) for a in run(q2, k2, v2))
        other = ~sel
        np.testing.assert_allclose(out2[other], out[other], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lse2.transpose(0, 2, 1)[other], lse.transpose(0, 2, 1)[other], rtol=1e-6, atol=1e-7)
        assert np.abs(out2[sel] - out[sel]).max() > 1e-2  # the edited segment did change
    # Padding (segment 0) is its own segment: it attends only to other padding.
    np.testing.assert_allclose(out[0, 9], np.asarray(v[0, 9]).repeat(h // g, axis=0), rtol=1e-6, atol=1e-6)


def test_mismatched_segment_ids_raise():
    q = jnp.zeros((1, 3, 2, 4))
    seg = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="segment"):
        reference.attention(q, q, q, scale=1.0, q_segment_ids=seg)
    with pytest.raises(ValueError, match="segment"):
        reference.attention(q, q, q, scale=1.0, kv_segment_ids=seg)
    with pytest.raises(ValueError, match="segment"):
        kernels.attention(q, q, q, scale=1.0, q_segment_ids=seg, backend="xla")


def test_heads_not_multiple_of_kv_heads_raises():
    q = jnp.zeros((1, 3, 6, 4))
    kv = jnp.zeros((1, 3, 4, 4))
    with pytest.raises(ValueError, match="multiple"):
        reference.attention(q, kv, kv, scale=1.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bfloat16_inputs(causal):
    b, t, s, h, g, kd, vd = 2, 6, 9, 8, 2, 24, 16
    rng = np.random.default_rng(31 + causal)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _inputs(rng, b, t, s, h, g, kd, vd))
    kv_seg = _packed_segments(rng, b, s, pad=False)
    q_seg = kv_seg[:, s - t :]
    scale = 1.0 / np.sqrt(kd)
    out, lse = ref_attention(
        q, k, v, scale=scale, causal=causal, q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg)
    )
    assert out.dtype == jnp.bfloat16
    assert lse.dtype == jnp.float32
    # The oracle sees the same bf16-rounded inputs, computed in float64.
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    ref_out, ref_lse = naive_attention(
        as64(q), as64(k), as64(v), scale=scale, causal=causal, q_seg=q_seg, kv_seg=kv_seg
    )
    _check(out.astype(jnp.float32), lse, ref_out, ref_lse, rtol=2e-2, atol=2e-2)
