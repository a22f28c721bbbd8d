"""The blocked grouped SwiGLU (CPU path) equals jax.lax.ragged_dot, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela.kernels.grouped import GROUPED, block_layout, blocked_swiglu, ragged_swiglu


def dense_reference(x, wg, wu, wd, sizes):
    """Row by row with its own expert's weights, in float64 numpy."""
    expert = np.repeat(np.arange(len(sizes)), sizes)
    out = []
    for row, e in zip(np.asarray(x, np.float64), expert):
        g, u = row @ np.asarray(wg[e], np.float64), row @ np.asarray(wu[e], np.float64)
        out.append((g / (1 + np.exp(-g)) * u) @ np.asarray(wd[e], np.float64))
    return np.stack(out)


def problem(sizes, d=12, f=10, seed=0):
    rng = np.random.default_rng(seed)
    e, p = len(sizes), int(sum(sizes))
    x = jnp.asarray(rng.standard_normal((p, d)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32)
    return x, wg, wu, wd, jnp.asarray(sizes, jnp.int32)


SIZES = [[5, 0, 7, 1], [0, 0, 16, 0], [3, 3, 3, 3, 3, 3], [1, 0, 0, 0, 0, 30], [9]]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("block", [1, 4, 8, 128])
@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_grouped_swiglu_matches_a_per_row_reference(sizes, block, impl):
    x, wg, wu, wd, gs = problem(sizes)
    y = jax.jit(GROUPED[impl], static_argnums=5)(x, wg, wu, wd, gs, block)
    np.testing.assert_allclose(y, dense_reference(x, wg, wu, wd, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", SIZES[:4])
def test_blocked_gradients_equal_ragged_dot(sizes):
    x, wg, wu, wd, gs = problem(sizes, seed=1)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((x.shape[0], x.shape[1])), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, gs, 4) * cot)

    ours = jax.jit(jax.grad(loss(blocked_swiglu), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    ref = jax.jit(jax.grad(loss(ragged_swiglu), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_block_layout_starts_every_group_on_a_block():
    gs = jnp.asarray([5, 0, 7, 1], jnp.int32)
    dest, block_expert, nb = block_layout(gs, 13, 4)
    assert nb == -(-13 // 4) + 4
    np.testing.assert_array_equal(dest, [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 16])
    np.testing.assert_array_equal(block_expert[:5], [0, 0, 2, 2, 3])


def test_auto_picks_blocked_on_cpu():
    assert (
        jax.default_backend() == "cpu"
        and GROUPED.resolve("auto") == "blocked"
        and GROUPED.resolve("ragged_dot") == "ragged_dot"
    )
