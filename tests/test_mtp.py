"""Multi-token prediction in training: which positions each depth scores, the loss and its
gradient against a plain-logits reference, gradient accumulation, and a run that logs each
depth's loss and resumes bit-identically. (The module's math against the DeepSeek-V3 report:
``test_hf_mtp.py``; every mesh strategy: ``test_parallel.py``.)"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moela.configs import load
from moela.model.transformer import init_model
from moela.training.losses import mtp_targets
from moela.training.step import make_train_step
from tests.test_parallel import packed_batch
from tests.test_train import assert_same_run, corpus, data_dir, metric_lines, overrides, run_train  # noqa: F401

LAMBDA = 0.3


def reference_targets(batch: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Position by position: i scores the token k + 1 ahead (input i + k + 1 of the same document)
    when positions i .. i + k + 1 all lie in one real document of the row."""
    inputs, targets, seg = (np.asarray(batch[n]) for n in ("inputs", "targets", "segment_ids"))
    b, t = inputs.shape
    out, mask = np.zeros((b, t), np.int64), np.zeros((b, t), np.float32)
    for r in range(b):
        for i in range(t):
            j = i + k
            if j < t and seg[r, i] > 0 and seg[r, j] == seg[r, i]:
                out[r, i], mask[r, i] = targets[r, j], 1.0
    return out, mask


@pytest.mark.parametrize("k", [1, 2, 5])
def test_each_depth_scores_the_token_k_plus_1_ahead_inside_its_document(k):
    batch = packed_batch(vocab=97, seed=k)
    targets, mask = mtp_targets(jax.tree.map(jnp.asarray, batch), k)
    want_targets, want_mask = reference_targets(batch, k)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_array_equal(np.asarray(targets) * want_mask, want_targets * want_mask)
    assert 0 < want_mask.sum() < np.asarray(batch["loss_mask"]).sum()  # document ends and padding bite


def mtp_config(**extra):
    sets = {
        "model.mtp_depth": 2,
        "model.moe.seq_aux_loss_coef": 0.01,
        "train.mtp_loss_weight": LAMBDA,
        "train.loss_chunk_tokens": 64,
        "train.global_batch_size": 8,
        "train.seq_len": 32,
        **extra,
    }
    return load("tiny", [f"{k}={v}" for k, v in sets.items()])


def reference_objective(model, batch):
    """(loss, [D] per-depth CE) from full logits: main CE/tokens + aux + lambda x mean_k CE_k/n_k."""
    inputs, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
    x, aux = model.features(inputs, positions, segments)
    main = optax.softmax_cross_entropy_with_integer_labels(model.logits(x), batch["targets"])
    loss = jnp.sum(main * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]) + aux["aux_loss"]
    hidden, mtp_aux = model.mtp_features(x, inputs, positions, segments)
    depth_ce = []
    for k, h in enumerate(hidden, start=1):
        targets, mask = reference_targets(batch, k)
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), jnp.asarray(targets, jnp.int32))
        depth_ce.append(jnp.sum(ce * mask) / mask.sum())
    depth_ce = jnp.stack(depth_ce)
    return loss + mtp_aux["aux_loss"] + LAMBDA * jnp.mean(depth_ce), depth_ce


@pytest.mark.parametrize("microbatches, remat", [(1, "none"), (2, "full")])
def test_train_step_gradient_equals_autodiff_of_the_plain_mtp_loss(microbatches, remat):
    cfg = mtp_config(**{"train.microbatches": microbatches, "runtime.remat": remat})
    model = init_model(cfg.model, seed=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, packed_batch(cfg.model.vocab_size, seed=7))
    tx = optax.sgd(1.0)  # the update is minus the gradient
    new_params, _, _, metrics = make_train_step(graphdef, cfg, tx)(
        jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest), tx.init(params), batch
    )
    grads = jax.tree.map(lambda a, b: a - b, params, new_params)

    def plain(p):
        return reference_objective(nnx.merge(graphdef, p, rest), batch)

    (_, depth_ce), expected = jax.value_and_grad(plain, has_aux=True)(params)
    np.testing.assert_allclose(metrics["mtp_loss"], depth_ce, rtol=1e-5)
    assert np.all(np.asarray(depth_ce) > 4.0)  # near ln(vocab) at init: the depths are really scored
    mtp_grads = 0.0
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(expected)):
        np.testing.assert_allclose(a[...], b[...], atol=2e-6, rtol=1e-4, err_msg=str(path))
        if path[0] == "mtp":
            mtp_grads += float(jnp.sum(jnp.abs(a[...])))
    assert mtp_grads > 0  # the modules learn


def test_without_mtp_the_model_draws_the_same_weights():
    plain, mtp = (init_model(load("tiny", [f"model.mtp_depth={d}"]).model, seed=4) for d in (0, 1))
    mtp_state = nnx.to_flat_state(nnx.state(mtp))
    shared = {path: leaf for path, leaf in mtp_state if path[0] != "mtp"}
    for path, leaf in nnx.to_flat_state(nnx.state(plain)):
        np.testing.assert_array_equal(leaf[...], shared[path][...], err_msg=str(path))
    assert any(path[0] == "mtp" for path, _ in mtp_state)


def test_a_run_logs_each_depth_and_resumes_bit_identically(corpus, data_dir, tmp_path):  # noqa: F811
    args = overrides(corpus, data_dir, tmp_path / "ref") + ["model.mtp_depth=2", "train.mtp_loss_weight=0.3"]
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [r for r in metric_lines(tmp_path / "ref") if "loss" in r]
    assert len(lines) == 12 and {"mtp_loss_1", "mtp_loss_2"} <= lines[0].keys()
    assert np.mean([r["mtp_loss_1"] for r in lines[-3:]]) < lines[0]["mtp_loss_1"] - 0.3
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", out)
    for step in (8, 11):
        shutil.rmtree(out / "checkpoints" / str(step))
    args = overrides(corpus, data_dir, out) + ["model.mtp_depth=2", "train.mtp_loss_weight=0.3"]
    again = run_train(args)
    assert again.returncode == 0 and "checkpoints/5" in again.stdout, again.stderr[-3000:]
    assert_same_run(tmp_path / "ref", out)
