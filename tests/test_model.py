"""The decoder: shapes and dtypes, causality, packed-sequence isolation, variants, remat,
scan (compile size flat in depth), logical axis names, checkpoint round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moela.configs import RuntimeConfig, load
from moela.model.checkpoint import CheckpointError, load_model, save_params
from moela.model.runtime import Runtime
from moela.model.transformer import Decoder, init_model

MODEL_AXES = {
    "layers",
    "embed",
    "vocab",
    "mlp",
    "heads",
    "kv_heads",
    "qk",
    "v",
    "q_lora",
    "kv_lora",
    "rope",
    "expert",
    "norm",
}


def tiny(*overrides):
    return load("tiny", list(overrides)).model


@nnx.jit
def run(model, *args):
    """One compiled forward (eager dispatch of a scanned model is slow)."""
    return model(*args)


def tokens(b=2, t=16, vocab=1024, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def test_forward_shapes_dtypes_and_expert_load():
    cfg = tiny()
    logits, aux = run(init_model(cfg), tokens())
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.moe.num_experts)
    np.testing.assert_array_equal(aux["expert_load"].sum(-1), 2 * 16 * cfg.moe.experts_per_token)
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.attention.kind=gqa", "model.attention.num_kv_heads=2"],
        ["model.attention.kind=gqa", "model.attention.num_kv_heads=1"],
        [
            "model.attention.q_lora_rank=16",
            "model.rope.scaling=yarn",
            "model.rope.factor=4",
            "model.rope.original_max_position=8",
            "model.rope.mscale_all_dim=1",
        ],
        ["model.moe.num_experts=0"],
        ["model.first_k_dense=0"],
    ],
)
def test_causal_no_future_leak(overrides):
    model = init_model(tiny(*overrides))
    a, b = tokens(1, 12, seed=1), tokens(1, 12, seed=2)
    mixed = a.at[:, 7:].set(b[:, 7:])
    la, _ = run(model, a)
    lm, _ = run(model, mixed)
    np.testing.assert_allclose(la[:, :7], lm[:, :7], atol=1e-6)
    assert float(jnp.abs(la[:, 7:] - lm[:, 7:]).max()) > 1e-4


def test_packed_row_equals_documents_run_separately():
    """Segment ids + restarting positions: a packed row computes each document as if alone."""
    model = init_model(tiny())
    d1, d2, d3 = tokens(1, 5, seed=3), tokens(1, 7, seed=4), tokens(1, 4, seed=5)
    packed = jnp.concatenate([d1, d2, d3], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7 + [3] * 4], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7)) + list(range(4))], jnp.int32)
    logits, aux = run(model, packed, positions, segments)
    start = 0
    for doc in (d1, d2, d3):
        alone, _ = run(model, doc)
        np.testing.assert_allclose(logits[:, start : start + doc.shape[1]], alone, atol=2e-5)
        start += doc.shape[1]


def test_padding_segment_zero_is_excluded_from_expert_load():
    model = init_model(tiny())
    segments = jnp.asarray([[1] * 10 + [0] * 6], jnp.int32)
    _, aux = run(model, tokens(1, 16), None, segments)
    np.testing.assert_array_equal(aux["expert_load"].sum(-1), 10 * 2)


def test_tied_embeddings_share_the_table():
    model = init_model(tiny("model.tie_embeddings=true"))
    assert model.lm_head is None
    x = tokens(1, 4)
    logits, _ = run(model, x)
    model.embed.table[...] = model.embed.table[...] * 2.0
    logits2, _ = run(model, x)
    assert float(jnp.abs(logits2 - logits).max()) > 1e-3


def test_bfloat16_compute_tracks_float32():
    """Dense: close everywhere. MoE: a bf16 rounding may flip a near-tie in routing for a few
    tokens, so only the mean error is tight there."""
    x = tokens(2, 16)
    for extra, bound in ((["model.moe.num_experts=0"], "max"), ([], "mean")):
        l32, _ = run(init_model(tiny(*extra)), x)
        l16, _ = run(init_model(tiny(*extra, "model.compute_dtype=bfloat16")), x)
        assert l16.dtype == jnp.float32
        err = jnp.abs(l16 - l32)
        scale = float(jnp.abs(l32).max())
        assert float(err.max() if bound == "max" else err.mean()) < 0.02 * scale, (extra, float(err.max()))


def test_bfloat16_params_are_stored_in_bfloat16():
    model = init_model(tiny("model.param_dtype=bfloat16", "model.compute_dtype=bfloat16"))
    dtypes = {leaf.dtype for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "policy",
    ["full", pytest.param("dots", marks=pytest.mark.slow), pytest.param("dots_no_batch", marks=pytest.mark.slow)],
)
def test_remat_policies_keep_gradients(policy):
    x = tokens(2, 8)

    def grads(cfg, runtime=RuntimeConfig()):
        model = init_model(cfg)
        return nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, rt=Runtime(runtime))[0] ** 2)))(model)

    ref, got = grads(tiny()), grads(tiny(), RuntimeConfig(remat=policy))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(ref, nnx.Param)), nnx.to_flat_state(nnx.state(got, nnx.Param))
    ):
        np.testing.assert_allclose(a[...], b[...], atol=1e-6, err_msg=str(path))


def test_every_parameter_has_logical_axes():
    model = init_model(tiny("model.attention.q_lora_rank=16"))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert set(axes) <= MODEL_AXES, (path, axes)
        if path[0] in ("dense_blocks", "moe_blocks"):
            assert axes[0] == "layers"


def test_scanned_depth_does_not_grow_the_program():
    """Layers run under one scan: the lowered HLO of 2 and 8 layers differs by under 10%."""
    x = jax.ShapeDtypeStruct((2, 32), jnp.int32)

    def hlo_size(layers):
        cfg = tiny(f"model.num_layers={layers}")
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
        fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
        return len(fn.lower(state, x).as_text())

    small, big = hlo_size(2), hlo_size(8)
    assert abs(big - small) / small < 0.10, (small, big)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    cfg = load("tiny")
    model = init_model(cfg.model, seed=3)
    save_params(tmp_path / "run", cfg, nnx.state(model))
    cfg2, restored = load_model(tmp_path / "run")
    assert cfg2 == cfg
    x = tokens(2, 8)
    np.testing.assert_array_equal(run(model, x)[0], run(restored, x)[0])
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="available: \\[0\\]"):
        load_model(tmp_path / "run", step=5)


def test_a_checkpoint_written_before_the_runtime_section_still_loads(tmp_path, capsys):
    """config.json of an earlier moela kept execution settings inside ``model``: it loads, with one
    line saying which keys moved, onto the same parameters."""
    cfg = load("tiny")
    model = init_model(cfg.model, seed=4)
    save_params(tmp_path / "old", cfg, nnx.state(model))
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    del data["runtime"]
    data["model"]["remat"], data["model"]["attention"]["impl"] = "full", "xla"
    data["model"]["moe"].update(impl="blocked", block_rows=64, expert_dispatch="ring")
    (tmp_path / "old" / "config.json").write_text(json.dumps(data))
    cfg2, restored = load_model(tmp_path / "old")
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "model.remat -> runtime.remat" in note[0] and "written by an earlier moela" in note[0]
    assert cfg2.model == cfg.model and cfg2.runtime.remat == "full" and cfg2.runtime.grouped_block_rows == 64
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(run(restored, tokens)[0]), np.asarray(run(model, tokens)[0]))
