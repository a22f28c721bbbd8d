"""``model.rope`` against Hugging Face transformers (DeepSeek-V3's YaRN), plus rotation properties."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moela.configs.schema import RopeConfig
from moela.model.rope import Rotary, cos_sin_scale, inv_frequencies, softmax_scale, yarn_mscale

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds3  # noqa: E402

NOPE = 16  # qk_nope_head_dim: K = NOPE + P

# (theta, factor, original_max_position, beta_fast, beta_slow, mscale, mscale_all_dim, truncate, P)
YARN_CASES = [
    pytest.param(10000.0, 1.0, 4096, 32.0, 1.0, 1.0, 0.0, True, 64, id="factor1"),
    pytest.param(10000.0, 1.0, 4096, 32.0, 1.0, 1.0, 1.0, True, 32, id="factor1-msad1"),
    pytest.param(10000.0, 4.0, 4096, 32.0, 1.0, 0.707, 0.707, True, 64, id="factor4-ms.707-msad.707-v2lite"),
    pytest.param(10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 1.0, True, 64, id="factor40-ms1-msad1-v3"),
    pytest.param(10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 0.0, True, 64, id="factor40-ms1-msad0"),
    pytest.param(10000.0, 40.0, 4096, 32.0, 1.0, 0.0, 1.0, True, 64, id="factor40-ms0-msad1"),
    pytest.param(10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 1.0, True, 64, id="factor40-ms.707-msad1"),
    pytest.param(50000.0, 16.0, 2048, 16.0, 2.0, 1.0, 0.5, True, 16, id="factor16-theta5e4-betas"),
    pytest.param(10000.0, 8.0, 16, 32.0, 1.0, 1.0, 1.0, True, 8, id="factor8-tiny-orig16"),
    pytest.param(10000.0, 4.0, 4096, 32.0, 1.0, 1.0, 0.0, False, 64, id="factor4-no-truncate"),
    pytest.param(1e6, 32.0, 8192, 32.0, 1.0, 1.0, 1.0, False, 128, id="factor32-theta1e6-no-truncate"),
    pytest.param(10000.0, 4.0, 4096, 4.0, 4.0, 1.0, 0.0, False, 32, id="equal-betas-empty-ramp"),
    pytest.param(100.0, 4.0, 131072, 1024.0, 1.0, 1.0, 0.0, True, 16, id="theta100-high-clamped"),
]


def _hf_config(rope_parameters: dict, p: int) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=p,
        qk_nope_head_dim=NOPE,
        v_head_dim=16,
        max_position_embeddings=8192,
        rope_parameters=rope_parameters,
        rope_interleave=False,
    )


def _yarn(theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim, truncate):
    ours = RopeConfig(
        theta=theta,
        scaling="yarn",
        factor=factor,
        original_max_position=orig,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
        truncate=truncate,
    )
    hf = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": orig,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
        "truncate": truncate,
    }
    return ours, hf


@pytest.mark.parametrize("theta,factor,orig,beta_fast,beta_slow,mscale,mscale_all_dim,truncate,p", YARN_CASES)
def test_yarn_matches_hf(theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim, truncate, p):
    ours, hf_params = _yarn(theta, factor, orig, beta_fast, beta_slow, mscale, mscale_all_dim, truncate)
    config = _hf_config(hf_params, p)
    hf_inv, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv = inv_frequencies(ours, p)
    assert inv.shape == (p // 2,) and inv.dtype == np.float32
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(cos_sin_scale(ours), hf_attention_factor, rtol=1e-12)
    k = NOPE + p
    hf_scale = hf_ds3.yarn_apply_mscale(config.rope_parameters, k**-0.5)
    np.testing.assert_allclose(softmax_scale(ours, k), hf_scale, rtol=1e-12)
    # The HF attention module really uses that scale.
    np.testing.assert_allclose(hf_ds3.DeepseekV3Attention(config, 0).scaling, softmax_scale(ours, k), rtol=1e-12)


@pytest.mark.parametrize("p", [8, 16, 64])
@pytest.mark.parametrize("theta", [10000.0, 5e5])
def test_default_rope_matches_hf(theta, p):
    # YaRN-only fields are ignored without scaling="yarn".
    ours = RopeConfig(theta=theta, factor=40.0, mscale=0.707, mscale_all_dim=1.0)
    config = _hf_config({"rope_type": "default", "rope_theta": theta}, p)
    hf_inv, hf_factor = hf_ds3.DeepseekV3RotaryEmbedding.compute_default_rope_parameters(config)
    np.testing.assert_allclose(inv_frequencies(ours, p), hf_inv.numpy(), rtol=1e-6, atol=0)
    assert cos_sin_scale(ours) == hf_factor == 1.0
    k = NOPE + p
    assert softmax_scale(ours, k) == pytest.approx(hf_ds3.yarn_apply_mscale(config.rope_parameters, k**-0.5), rel=1e-12)
    assert softmax_scale(ours, k) == pytest.approx(k**-0.5, rel=1e-12)


def test_yarn_is_a_real_change():
    """Sanity of the cases above: with factor > 1 YaRN rescales the low frequencies only."""
    plain = inv_frequencies(RopeConfig(), 64)
    yarn = inv_frequencies(RopeConfig(scaling="yarn", factor=40.0, original_max_position=4096), 64)
    np.testing.assert_array_equal(yarn[:8], plain[:8])  # fast dims extrapolate unchanged
    np.testing.assert_allclose(yarn[-4:], plain[-4:] / 40.0, rtol=1e-6)  # slow dims interpolate
    assert np.all(np.diff(yarn) < 0)
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * np.log(40.0) + 1.0)
    assert yarn_mscale(1.0, 5.0) == 1.0 and yarn_mscale(0.5, 5.0) == 1.0


@pytest.mark.parametrize("case", ["default", "yarn-v3", "yarn-ms1-msad0"])
def test_tables_and_apply_match_hf(case):
    """cos/sin tables and the half-split rotation equal HF's DeepseekV3RotaryEmbedding and
    apply_rotary_pos_emb (rope_interleave=False), attention factor included."""
    p = 16
    if case == "default":
        ours, hf_params = RopeConfig(theta=10000.0), {"rope_type": "default", "rope_theta": 10000.0}
    elif case == "yarn-v3":
        ours, hf_params = _yarn(10000.0, 40.0, 64, 32.0, 1.0, 1.0, 1.0, True)
    else:
        ours, hf_params = _yarn(10000.0, 8.0, 64, 32.0, 1.0, 1.0, 0.0, True)
    config = _hf_config(hf_params, p)
    rng = np.random.default_rng(0)
    b, t, h = 2, 7, 3
    positions = np.stack([np.arange(t), rng.integers(0, 3000, t)]).astype(np.int64)
    x = rng.standard_normal((b, 1, t, p)).astype(np.float32)
    q = rng.standard_normal((b, h, t, p)).astype(np.float32)

    rotary_hf = hf_ds3.DeepseekV3RotaryEmbedding(config)
    cos_hf, sin_hf = rotary_hf(torch.from_numpy(x), torch.from_numpy(positions))
    cos_hf, sin_hf = cos_hf.numpy(), sin_hf.numpy()
    rot = Rotary(ours, p)
    cos, sin = rot.tables(jnp.asarray(positions, jnp.int32))
    assert cos.shape == (b, t, p // 2)
    for half in (slice(None, p // 2), slice(p // 2, None)):
        np.testing.assert_allclose(np.asarray(cos), cos_hf[..., half], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(sin), sin_hf[..., half], rtol=1e-5, atol=2e-6)

    q_hf, k_hf = hf_ds3.apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(cos_hf), torch.from_numpy(sin_hf)
    )
    q_ours = Rotary.apply(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)  # [B, T, H, P]
    k_ours = Rotary.apply(jnp.asarray(x[:, 0]), cos, sin)  # [B, T, P]: no head axis (MLA's k_pe)
    np.testing.assert_allclose(np.asarray(q_ours), q_hf.numpy().transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(k_ours), k_hf.numpy()[:, 0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- rotation properties

PROPERTY_ROPES = [
    pytest.param(RopeConfig(), id="default"),
    pytest.param(
        RopeConfig(scaling="yarn", factor=40.0, original_max_position=64, mscale=1.0, mscale_all_dim=1.0),
        id="yarn-scale1",
    ),
    pytest.param(
        RopeConfig(scaling="yarn", factor=40.0, original_max_position=64, mscale=1.0, mscale_all_dim=0.0),
        id="yarn-scaled",
    ),
]


def _pair_norms(x, p):
    return np.sqrt(x[..., : p // 2] ** 2 + x[..., p // 2 :] ** 2)


@pytest.mark.parametrize("rope", PROPERTY_ROPES)
def test_rotation_preserves_pair_norms(rope):
    p = 16
    rot = Rotary(rope, p)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 4, p)).astype(np.float32)
    positions = jnp.asarray(rng.integers(0, 5000, (2, 9)), jnp.int32)
    cos, sin = rot.tables(positions)
    y = np.asarray(Rotary.apply(jnp.asarray(x), cos, sin), np.float64)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(_pair_norms(y, p), rot.scale * _pair_norms(x64, p), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, rot.scale * x64, atol=1e-2)  # it did rotate


@pytest.mark.parametrize("rope", PROPERTY_ROPES)
def test_position_zero_is_identity_times_scale(rope):
    p = 16
    rot = Rotary(rope, p)
    x = np.random.default_rng(2).standard_normal((2, 5, 3, p)).astype(np.float32)
    cos, sin = rot.tables(jnp.zeros((2, 5), jnp.int32))
    y = np.asarray(Rotary.apply(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(y, rot.scale * x, rtol=1e-6, atol=1e-7)
    if rot.scale == 1.0:
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("rope", PROPERTY_ROPES)
def test_relative_position_property(rope):
    """<R(m) q, R(n) k> depends only on m - n."""
    p = 16
    rot = Rotary(rope, p)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 1, p)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, p)), jnp.float32)

    def score(m, n):
        cq, sq = rot.tables(jnp.full((1, 1), m, jnp.int32))
        ck, sk = rot.tables(jnp.full((1, 1), n, jnp.int32))
        return float(jnp.sum(Rotary.apply(q, cq, sq) * Rotary.apply(k, ck, sk)))

    for m, n in [(5, 2), (2, 5), (17, 17), (40, 1)]:
        base = score(m, n)
        for shift in (1, 13, 250):
            np.testing.assert_allclose(score(m + shift, n + shift), base, rtol=1e-4, atol=1e-4)
    # ... and it does depend on m - n.
    assert abs(score(5, 2) - score(2, 5)) > 1e-3
    assert abs(score(5, 2) - score(6, 2)) > 1e-3


def test_apply_keeps_dtype_and_head_axes():
    rot = Rotary(RopeConfig(), 8)
    cos, sin = rot.tables(jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4)))
    x = jnp.ones((2, 4, 3, 5, 8), jnp.bfloat16)  # two head axes between T and P
    y = Rotary.apply(x, cos, sin)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    # Every head is rotated the same way at a given position.
    np.testing.assert_array_equal(np.asarray(y[:, :, 0, 0]), np.asarray(y[:, :, 2, 4]))
