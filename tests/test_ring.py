"""Ring attention (``parallel.ring``) and the block backward op (``kernels.attention_bwd``).

Every sharded result is compared with ``kernels.reference.attention`` on the whole, naturally
ordered sequence: inputs are permuted into the zig-zag layout, outputs permuted back, and
gradients flow through both permutations, so the check covers values and dq/dk/dv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moela import kernels
from moela.configs.schema import MeshConfig
from moela.kernels import reference
from moela.model.runtime import ONE_DEVICE
from moela.parallel.layout import Layout
from moela.parallel.mesh import build_mesh
from moela.parallel.ring import inverse_permutation, ring_attention, zigzag_permutation

SCALE = 0.3


def qkv(b, t, h, g, kd, vd, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, h, kd), (b, t, g, kd), (b, t, g, vd))
    )


def segments(b, t, seed=0):
    """Uneven packed rows: row 0's first segment spans the first ~60% of the sequence (several
    shards); the others are random short segments; every row ends in padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        pos, sid = 0, 1
        end = t - int(rng.integers(1, max(2, t // 4)))
        while pos < end:
            length = int(0.6 * t) if (row == 0 and sid == 1) else int(rng.integers(1, max(2, t // 3)))
            seg[row, pos : min(pos + length, end)] = sid
            pos, sid = pos + length, sid + 1
    return jnp.asarray(seg)


def vjp_of(fn, q, k, v, d_out):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + pull(d_out)


def assert_close(got, want, names, atol=1e-5):
    for name, a, b in zip(names, got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------- kernels.attention_bwd


BWD_CASES = [  # b, t, s, h, g, kd, vd, causal, segments
    (2, 9, 9, 4, 4, 24, 16, True, True),
    (2, 5, 9, 8, 2, 16, 8, True, True),  # GQA, causal offset
    (1, 6, 6, 4, 1, 12, 8, False, True),  # MQA, no causal mask
    (2, 7, 7, 4, 2, 8, 8, True, False),
]


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("case", BWD_CASES)
def test_attention_bwd_matches_autodiff_of_reference(case, impl):
    b, t, s, h, g, kd, vd, causal, with_seg = case
    q, k, v = qkv(b, s, h, g, kd, vd)
    q = q[:, s - t :]
    kw = {}
    if with_seg:
        kv_seg = np.asarray(segments(b, s, seed=1))
        q_seg = kv_seg[:, s - t :].copy()
        q_seg[0, 0] = 99  # a row with nothing visible: lse -inf, no gradient
        kw = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    rng = np.random.default_rng(2)
    d_out = jnp.asarray(rng.standard_normal((b, t, h, vd)), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32)

    @jax.jit
    def run(q, k, v, d_out, d_lse):
        (out, lse), pull = jax.vjp(lambda *a: reference.attention(*a, scale=SCALE, causal=causal, **kw), q, k, v)
        bwd = lambda **extra: kernels.attention_bwd(
            q, k, v, out, lse, d_out, scale=SCALE, causal=causal, backend=impl, **kw, **extra
        )
        with_lse = bwd(d_lse_bht=d_lse), pull((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0)))
        return with_lse, (bwd(), pull((d_out, jnp.zeros_like(lse))))  # the op's default: no lse cotangent

    for got, want in run(q, k, v, d_out, d_lse):
        assert_close(got, want, "qkv")


# ---------------------------------------------------------------- zig-zag layout


@pytest.mark.parametrize("t,n", [(8, 1), (16, 2), (48, 4), (64, 8)])
def test_zigzag_permutation(t, n):
    perm = zigzag_permutation(t, n)
    assert sorted(perm.tolist()) == list(range(t))
    c = t // (2 * n)
    for i, shard in enumerate(perm.reshape(n, 2 * c)):
        assert shard.tolist() == list(range(i * c, (i + 1) * c)) + list(range((2 * n - 1 - i) * c, (2 * n - i) * c))
    x = np.arange(t) * 10
    np.testing.assert_array_equal(x[perm][inverse_permutation(perm)], x)
    with pytest.raises(ValueError, match="divisible by 2"):
        zigzag_permutation(t + n, n) if n > 1 else zigzag_permutation(7, 1)


# ---------------------------------------------------------------- sharded_attention vs the reference


RING_CASES = [  # (data, tensor, sequence), b, t, h, g, kd, vd, kv_heads_name, impl
    ((1, 1, 8), 2, 32, 4, 4, 24, 16, "act_heads", "auto"),  # MLA-like: Dqk != Dv, one kv head per q head
    ((2, 1, 4), 2, 48, 4, 2, 24, 16, "act_kv_heads", "auto"),  # GQA, batch over data
    ((1, 2, 4), 2, 64, 4, 2, 16, 16, "act_kv_heads", "reference"),  # GQA, heads over tensor
    ((2, 2, 2), 2, 32, 4, 4, 24, 16, "act_heads", "xla"),
    ((2, 2, 2), 2, 32, 4, 2, 24, 16, "act_kv_heads", "interpret"),  # Pallas TPU kernel inside the ring blocks
    ((4, 2, 1), 4, 32, 4, 4, 24, 16, "act_heads", "interpret"),  # length unsplit: the kernel per (rows, heads) shard
]


@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: "x".join(map(str, c[0])) if isinstance(c, tuple) else None)
def test_sharded_attention_matches_reference(case):
    mesh_dims, b, t, h, g, kd, vd, kv_heads_name, impl = case
    layout = Layout.of(build_mesh(MeshConfig(*mesh_dims)), "dp_tp_sp")
    q, k, v = qkv(b, t, h, g, kd, vd)
    seg = segments(b, t)
    d_out = jnp.asarray(np.random.default_rng(3).standard_normal((b, t, h, vd)), jnp.float32)
    perm = zigzag_permutation(t, mesh_dims[2])
    inv = inverse_permutation(perm)

    def ring(q, k, v):
        out = layout.attention(
            q[:, perm], k[:, perm], v[:, perm], seg[:, perm], scale=SCALE, backend=impl, kv_heads=kv_heads_name
        )
        return out[:, inv]

    def ref(q, k, v):
        return reference.attention(q, k, v, scale=SCALE, causal=True, q_segment_ids=seg, kv_segment_ids=seg)[0]

    got = jax.jit(lambda *a: vjp_of(ring, *a))(q, k, v, d_out)
    assert_close(got, jax.jit(lambda *a: vjp_of(ref, *a))(q, k, v, d_out), ("out", "dq", "dk", "dv"))


def _ring_island(mesh, seq, scale=SCALE):
    """ring_attention over ``seq`` returning (out, lse), with q and kv segment ids of their own."""
    spec, seg_spec, lse_spec = P(None, seq, None, None), P(None, seq), P(None, None, seq)
    return jax.shard_map(
        lambda q, k, v, qs, ks: ring_attention(q, k, v, qs, ks, scale=scale, axis_name=seq),
        mesh=mesh,
        in_specs=(spec, spec, spec, seg_spec, seg_spec),
        out_specs=(spec, lse_spec),
    )


@pytest.mark.parametrize("sequence", [4, 1])
def test_rows_with_nothing_visible_and_lse_gradient(sequence):
    """q and kv segments differ: whole rows (and, for ring steps, whole blocks) see nothing. Out
    0, lse -inf, no NaNs anywhere, and values and gradients (through out and lse) match."""
    b, t, h, g, kd, vd = 2, 32, 2, 2, 8, 8
    mesh = build_mesh(MeshConfig(data=8 // sequence, tensor=1, sequence=sequence))
    q, k, v = qkv(b, t, h, g, kd, vd, seed=4)
    kv_seg = np.asarray(segments(b, t, seed=5))
    q_seg = kv_seg.copy()
    q_seg[1] = 0  # row 1 is all padding (its keys are segment 0 only where kv padding is)
    q_seg[0, 3:9] = 77  # queries of a segment with no keys
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    perm = zigzag_permutation(t, sequence)
    inv = inverse_permutation(perm)
    rng = np.random.default_rng(6)
    w_out = jnp.asarray(rng.standard_normal((b, t, h, vd)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32)
    island = _ring_island(mesh, "sequence")

    def ring(q, k, v):
        out, lse = island(q[:, perm], k[:, perm], v[:, perm], q_seg[:, perm], kv_seg[:, perm])
        return out[:, inv], lse[..., inv]

    def ref(q, k, v):
        return reference.attention(q, k, v, scale=SCALE, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * w_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

    both = jax.jit(lambda *a: (ring(*a), jax.grad(lambda *x: loss(ring, *x), argnums=(0, 1, 2))(*a)))
    (out, lse), grads = both(q, k, v)
    want_out, want_lse = jax.jit(ref)(q, k, v)
    assert not np.isfinite(np.asarray(lse)).all()  # the test really has rows that see nothing
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    np.testing.assert_allclose(
        np.where(np.isfinite(want_lse), lse, 0), np.where(np.isfinite(want_lse), want_lse, 0), atol=1e-5
    )
    assert_close((out,), (want_out,), ("out",))
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
    assert_close(grads, jax.jit(jax.grad(lambda *x: loss(ref, *x), argnums=(0, 1, 2)))(q, k, v), "qkv")


def test_unsplit_length_is_plain_attention():
    """No layout, or a layout whose length axis has one device: ``kernels.attention`` unchanged
    (segment ids None included)."""
    q, k, v = qkv(8, 16, 4, 2, 8, 8, seed=7)
    want = jax.jit(lambda *a: reference.attention(*a, scale=SCALE, causal=True)[0])(q, k, v)
    plain = jax.jit(lambda *a: ONE_DEVICE.attention(*a, None, scale=SCALE, backend="auto", kv_heads="act_kv_heads"))
    assert_close((plain(q, k, v),), (want,), ("out",))
    layout = Layout.of(build_mesh(MeshConfig(data=8, tensor=1, sequence=1)), "dp_tp_sp")

    @jax.jit
    def under_layout(q, k, v):
        return layout.attention(q, k, v, None, scale=SCALE, backend="auto", kv_heads="act_kv_heads")

    assert_close((under_layout(q, k, v),), (want,), ("out",))


def test_length_not_divisible_raises():
    layout = Layout.of(build_mesh(MeshConfig(data=2, tensor=1, sequence=4)), "dp_tp_sp")
    q, k, v = qkv(2, 12, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="divisible by 2\\*4"):
        layout.attention(q, k, v, None, scale=SCALE, backend="auto", kv_heads="act_kv_heads")
