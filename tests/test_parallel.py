"""The same model on every mesh: logits, loss and gradients under each strategy equal the
single-device run (8 fake CPU devices), parameters are born sharded where the rules say, the
optimizer state follows them, and sharding mistakes are errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moela.configs import load
from moela.configs.schema import MeshConfig
from moela.model.transformer import init_model
from moela.parallel import sharded
from moela.model.runtime import ONE_DEVICE, Runtime
from moela.parallel.layout import Layout, format_report, sharding_report
from moela.parallel.mesh import build_mesh
from moela.parallel.rules import ShardingRuleError
from moela.training.step import training_objective

B, T = 8, 32

MODELS = {
    "mla_moe": [],
    "gqa": ["model.attention.kind=gqa", "model.attention.num_kv_heads=2", "model.moe.num_experts=0"],
    "mla_moe_mtp": ["model.mtp_depth=1"],  # a multi-token-prediction depth: shifted tokens, one more block
}
CASES = [  # (mesh data, tensor, sequence), strategy
    ((8, 1, 1), "fsdp"),
    ((2, 2, 2), "dp_tp_sp"),
    ((1, 2, 4), "fsdp_tp_sp"),
    ((4, 2, 1), "ep_tp"),
    ((1, 1, 8), "dp_tp_sp"),
]


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Rows of several documents each (positions restart, segment ids count up) and trailing padding."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for r in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        end = T - int(rng.integers(0, 6))
        bounds = [0, *[c for c in cuts if c < end], end]
        for s, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[r, a:e] = s + 1
            positions[r, a:e] = np.arange(e - a)
    inputs = rng.integers(4, vocab, (B, T), dtype=np.int32)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "positions": positions,
        "segment_ids": segments,
        "loss_mask": (segments > 0).astype(np.float32),
    }


def forward_loss_grads(graphdef, params, rest, batch, partitioner=ONE_DEVICE):
    rt = Runtime(partitioner=partitioner)
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], rt=rt)

    def loss(p):
        obj, _, _, aux = training_objective(graphdef, p, rest, batch, z_coef=1e-3, chunk_tokens=64, rt=rt)
        return obj / jnp.sum(batch["loss_mask"]) + aux["aux_loss"] + jnp.sum(aux.get("mtp_ce", 0.0)) / 100.0

    value, grads = jax.value_and_grad(loss)(params)
    return logits, value, grads


def config(model: str):
    return load("tiny", MODELS[model] + ["model.moe.seq_aux_loss_coef=0.01"])


@pytest.fixture(scope="module")
def single_device():
    results = {}
    for name in MODELS:
        cfg = config(name)
        graphdef, params, rest = nnx.split(init_model(cfg.model, seed=1), nnx.Param, ...)
        batch = packed_batch(cfg.model.vocab_size)
        results[name] = jax.jit(lambda p, r, b, g=graphdef: forward_loss_grads(g, p, r, b))(params, rest, batch)
    return results


FAST = {("mla_moe", (2, 2, 2)), ("gqa", (1, 1, 8)), ("mla_moe_mtp", (1, 1, 8))}  # the rest run in CI's slow step
MESH_CASES = [
    pytest.param(
        model,
        shape,
        strategy,
        id=f"{'x'.join(map(str, shape))}-{strategy}-{model}",
        marks=() if (model, shape) in FAST else pytest.mark.slow,
    )
    for shape, strategy in CASES
    for model in sorted(MODELS)
]


@pytest.mark.parametrize("model, shape, strategy", MESH_CASES)
def test_every_mesh_matches_one_device(single_device, model, shape, strategy):
    cfg = config(model)
    layout = Layout.of(build_mesh(MeshConfig(*shape)), strategy)
    graphdef, params, rest = nnx.split(sharded.init_model(cfg.model, layout, seed=1), nnx.Param, ...)
    batch = jax.device_put(packed_batch(cfg.model.vocab_size), sharded.batch_sharding(layout))

    def run(p, r, b):
        return forward_loss_grads(graphdef, p, r, b, layout)

    logits, loss, grads = jax.jit(run)(params, rest, batch)
    want_logits, want_loss, want_grads = single_device[model]
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, atol=1e-5, rtol=1e-5)
    for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)):
        np.testing.assert_allclose(g[...], w[...], atol=1e-5, rtol=1e-4, err_msg=str(path))


def test_parameters_are_born_sharded_and_reported():
    cfg = config("mla_moe")
    layout = Layout.of(build_mesh(MeshConfig(2, 2, 2)), "fsdp_tp_sp")
    model = sharded.init_model(cfg.model, layout, seed=1)
    reference = init_model(cfg.model, seed=1)
    wq = model.dense_blocks.attn.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "data", "tensor", None)  # [L, D_X, H_Y, K]
    assert {s.data.shape for s in wq.addressable_shards} == {(1, 32, 2, 24)}
    np.testing.assert_array_equal(wq, reference.dense_blocks.attn.wq[...])  # same values as one device
    rows = {r["path"]: r for r in sharding_report(nnx.state(model), layout)}
    assert rows["dense_blocks/attn/wq"]["bytes_per_device"] == 64 * 4 * 24 * 4 // 4
    assert rows["embed/table"]["spec"] == ("tensor", "data")
    assert "MiB/device" in format_report(list(rows.values()))

    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1e-3)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_state = sharded.init_optimizer(tx, params, shardings, layout)
    mu = opt_state[0].mu["dense_blocks"]["attn"]["wq"][...]
    assert mu.sharding.spec == wq.sharding.spec and opt_state[0].count.sharding.spec == jax.sharding.PartitionSpec()


def test_sharding_mistakes_are_errors():
    mesh = build_mesh(MeshConfig(2, 2, 2))
    with pytest.raises(ShardingRuleError, match="unknown sharding strategy 'zero'"):
        Layout.of(mesh, "zero")
    with pytest.raises(ShardingRuleError, match=r"mesh axes \['tensor', 'sequence'\] have \[2, 2\] devices"):
        Layout.of(mesh, "dp")
    layout = Layout.of(build_mesh(MeshConfig(1, 8, 1)), "tp")
    with pytest.raises(ShardingRuleError, match="not divisible by 8"):  # 4 heads over 8 devices
        sharded.model_shardings(config("mla_moe").model, layout)


@pytest.mark.slow
def test_sharded_train_step_with_microbatches_equals_one_device():
    """The trainer's step (2 microbatches, AdamW, router-bias update) on a (2, 2, 2) mesh with
    ring attention and expert parallelism lands on the one-device parameters, in the
    shardings it started with."""
    from moela.training.optim import optimizer
    from moela.training.step import make_train_step

    cfg = load("tiny", ["train.microbatches=2", "model.moe.bias_update_rate=0.01"])
    tx = optimizer(cfg.train)
    batch = packed_batch(cfg.model.vocab_size, seed=3)
    graphdef, params, rest = nnx.split(init_model(cfg.model, seed=2), nnx.Param, ...)
    want_params, want_rest, _, want = make_train_step(graphdef, cfg, tx)(params, rest, tx.init(params), batch)

    layout = Layout.of(build_mesh(MeshConfig(2, 2, 2)), "dp_tp_sp")
    _, params, rest, opt_state, state_shardings = sharded.init_train_state(cfg.model, tx, layout, seed=2)
    shardings = state_shardings[:2]
    step = make_train_step(graphdef, cfg, tx, layout, state_shardings)
    new_params, new_rest, _, got = step(params, rest, opt_state, jax.device_put(batch, sharded.batch_sharding(layout)))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    for (path, a), (_, b), (_, s) in zip(
        nnx.to_flat_state(new_params), nnx.to_flat_state(want_params), nnx.to_flat_state(shardings[0])
    ):
        np.testing.assert_allclose(a[...], b[...], atol=1e-6, err_msg=str(path))
        assert a[...].sharding == s.get_value(), path
    np.testing.assert_allclose(
        new_rest["moe_blocks"]["ffn"]["router"]["bias"][...],
        want_rest["moe_blocks"]["ffn"]["router"]["bias"][...],
        atol=1e-7,
    )
