"""The chunked output-layer loss against autodiff of the plain log-softmax loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moela.training.losses import head_loss, loss_chunks


def reference(x_btd, w, targets_bt, weights_bt, z_coef, layout):
    eq = "btd,dn->btn" if layout == "dn" else "btd,nd->btn"
    logits = jnp.einsum(eq, x_btd, w.astype(x_btd.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(weights_bt * (lse - target)) + z_coef * jnp.sum(weights_bt * lse**2)


def inputs(b=3, t=12, d=16, n=50, layout="dn", dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (b, t, d), jnp.float32).astype(dtype)
    w = 0.5 * jax.random.normal(ks[1], (d, n) if layout == "dn" else (n, d), jnp.float32)
    targets = jax.random.randint(ks[2], (b, t), 0, n)
    weights = (jax.random.uniform(ks[3], (b, t)) > 0.3).astype(jnp.float32)  # some positions masked
    return x, w, targets, weights


@pytest.mark.parametrize("layout", ["dn", "nd"])
@pytest.mark.parametrize("chunks", [1, 3, 12])
@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
def test_value_and_gradients_match_autodiff(layout, chunks, z_coef):
    x, w, targets, weights = inputs(layout=layout)

    def fused(x, w):
        objective, stats = head_loss(x, w, targets, weights, z_coef=z_coef, chunks=chunks, layout=layout)
        return 0.7 * objective, stats  # a non-unit cotangent reaches the backward pass

    (obj, stats), (dx, dw) = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(x, w)
    ref, (rdx, rdw) = jax.value_and_grad(
        lambda x, w: 0.7 * reference(x, w, targets, weights, z_coef, layout), argnums=(0, 1)
    )(x, w)
    np.testing.assert_allclose(obj, ref, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, atol=1e-6)
    np.testing.assert_allclose(dw, rdw, atol=1e-6)
    ce_only = reference(x, w, targets, weights, 0.0, layout)
    np.testing.assert_allclose(stats["ce"], ce_only, rtol=1e-6)
    np.testing.assert_allclose(obj / 0.7, stats["ce"] + z_coef * stats["z"], rtol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    x, w, targets, weights = inputs(dtype=jnp.bfloat16)
    (obj, _), (dx, dw) = jax.value_and_grad(
        lambda x, w: head_loss(x, w, targets, weights, chunks=4), argnums=(0, 1), has_aux=True
    )(x, w)
    ref, (rdx, rdw) = jax.value_and_grad(
        lambda x, w: reference(x.astype(jnp.float32), w, targets, weights, 0.0, "dn"), argnums=(0, 1)
    )(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(obj, ref, rtol=2e-2)
    np.testing.assert_allclose(dx.astype(jnp.float32), rdx, atol=2e-2)
    np.testing.assert_allclose(dw, rdw, atol=5e-2)


def test_masked_positions_get_no_gradient():
    x, w, targets, weights = inputs()
    weights = weights.at[:, 5].set(0.0)
    dx = jax.grad(lambda x: head_loss(x, w, targets, weights, chunks=2)[0])(x)
    assert np.all(np.asarray(dx[:, 5]) == 0.0)
    assert np.any(np.asarray(dx[:, 4]) != 0.0) or np.all(np.asarray(weights[:, 4]) == 0.0)


def test_bad_arguments_are_refused():
    x, w, targets, weights = inputs()
    with pytest.raises(ValueError, match="positive divisor of the sequence length"):
        head_loss(x, w, targets, weights, chunks=5)
    with pytest.raises(ValueError, match="layout must be"):
        head_loss(x, w, targets, weights, layout="nn")


@pytest.mark.parametrize(
    "batch,seq,target,expected", [(8, 256, 256, 8), (8, 256, 10**9, 1), (1, 7, 2, 7), (4, 96, 100, 4)]
)
def test_loss_chunks_picks_a_divisor_near_the_target(batch, seq, target, expected):
    assert loss_chunks(batch, seq, target) == expected
