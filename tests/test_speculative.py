"""Speculative decoding with the MTP draft: greedy output equal to plain decoding token for token
(mixed batches, chunked prefill, preemption) on a model whose draft is right most of the time, the
acceptance rule keeping the target distribution (chi-square over many seeds, per row and end to
end against the model's exact distribution on a small vocabulary), and the bookkeeping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from moela.configs import load
from moela.configs.validate import ConfigError
from moela.inference.engine import Engine
from moela.inference.sampling import SamplingArrays, filtered_probs
from moela.inference.scheduler import Request
from moela.inference.speculative import verify
from moela.model.transformer import init_model
from moela.training.step import make_train_step

VOCAB, STEPS = 64, 150


def stride_batch(rng, rows: int, length: int) -> dict:
    """Rows t_i = (s + c·i) mod V: the next token follows from the last two, so both the model and
    its MTP module learn them in a few hundred steps."""
    start = rng.integers(0, VOCAB, (rows, 1))
    stride = rng.integers(1, 4, (rows, 1))
    seq = (start + stride * np.arange(length + 1)) % VOCAB
    return {
        "inputs": seq[:, :-1].astype(np.int32),
        "targets": seq[:, 1:].astype(np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, length), np.int32),
        "loss_mask": np.ones((rows, length), np.float32),
    }


@pytest.fixture(scope="module")
def stride_model():
    cfg = load(
        "tiny",
        [f"model.vocab_size={VOCAB}", "model.mtp_depth=1", "train.global_batch_size=16", "train.seq_len=32"],
    )
    graphdef, params, rest = nnx.split(init_model(cfg.model, seed=0), nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt, step = tx.init(params), make_train_step(graphdef, cfg, tx)
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        params, rest, opt, metrics = step(params, rest, opt, stride_batch(rng, 16, 32))
    assert float(metrics["mtp_loss"][0]) < 0.5, "the draft must have learnt the strides"
    return cfg, nnx.merge(graphdef, params, rest)


def serve(cfg, **serve):
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, **serve))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_equals_plain_decoding_with_chunks_and_preemption(stride_model, k):
    """Stride prompts (the draft is mostly right) and random ones (mostly wrong) in one batch; 16
    pages of 4 tokens cannot hold them all (preemption), a 16-token budget chunks the prompts."""
    cfg, model = stride_model
    rng = np.random.default_rng(1)
    prompts = [list(stride_batch(rng, 1, n)["inputs"][0]) for n in (3, 17, 9, 30)]
    prompts += [list(rng.integers(0, VOCAB, n)) for n in (5, 12)]
    reqs = [Request(str(i), [int(t) for t in p], max_tokens=14, index=i) for i, p in enumerate(prompts)]
    small = dict(page_size=4, num_pages=16, max_batch=4, max_batched_tokens=16)
    plain_engine = Engine(model, serve(cfg, **small))
    plain = plain_engine.generate(reqs)
    engine = Engine(model, serve(cfg, speculative_tokens=k, **small))
    spec = engine.generate(reqs)
    for a, b in zip(plain, spec):
        assert b.tokens == a.tokens and b.finish_reason == a.finish_reason, f"request {a.id}"
    s = engine.speculation
    assert engine.scheduler.preemptions > 0 and engine.allocator.used == 0
    assert s["accepted"][0] / s["proposed"][0] > 0.5  # the stride rows
    assert s["accepted"][0] < s["proposed"][0]  # and the random ones: rejections happen too
    assert s["emitted"] / s["verify_steps"] > 1.4
    assert engine.steps < plain_engine.steps


def test_acceptance_rule_keeps_the_target_distribution():
    """Per row, over 40,000 seeds: the first token emitted is distributed as the target's p_0 (not
    as the draft's q_1), and, when the first draft is accepted, the second as p_1."""
    v, k, s = 8, 2, 40_000
    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.broadcast_to(rng.normal(size=(1, k + 1, v)) * 1.5, (s, k + 1, v)), jnp.float32)
    draft_logits = rng.normal(size=(k, v)) * 1.5
    params = SamplingArrays(
        np.ones(s, np.float32),
        np.zeros(s, np.int32),
        np.ones(s, np.float32),
        np.arange(s, dtype=np.uint32),
        np.zeros(s, np.int32),
    )
    q = jax.vmap(lambda lv: filtered_probs(lv, 1.0, 0, 1.0))(jnp.asarray(draft_logits, jnp.float32))
    keys = jax.random.split(jax.random.key(7), s * k).reshape(s, k)
    drafts = jax.vmap(jax.vmap(lambda key, qv: jax.random.categorical(key, jnp.log(qv))), in_axes=(0, None))(keys, q)
    accepted, drawn = verify(
        logits, drafts.astype(jnp.int32), np.full(s, k, np.int32), jnp.broadcast_to(q, (s, k, v)), params
    )
    accepted, drawn, drafts = (np.asarray(a) for a in (accepted, drawn, drafts))
    p = np.asarray(jax.vmap(lambda lv: filtered_probs(lv, 1.0, 0, 1.0))(logits[0]))
    first = np.where(accepted >= 1, drafts[:, 0], drawn)
    second = np.where(accepted >= 2, drafts[:, 1], drawn)[accepted >= 1]
    for sample, probs in ((first, p[0]), (second, p[1])):
        counts = np.bincount(sample, minlength=v)
        probs = probs.astype(np.float64) / probs.sum()
        assert stats.chisquare(counts, probs * counts.sum()).pvalue > 1e-3
    wrong = np.bincount(drafts[:, 0], minlength=v)  # what an always-accept rule would emit
    assert stats.chisquare(wrong, p[0].astype(np.float64) / p[0].sum() * s).pvalue < 1e-12
    assert 0.2 < np.mean(accepted >= 1) < 0.95


def exact_marginals(model, prompt: list[int], steps: int, temperature: float, top_k: int, top_p: float):
    """The model's exact distribution of each generated token (full forwards over every prefix of
    a small vocabulary), under the same filters."""
    v = model.cfg.vocab_size
    prefixes, weights, out = np.asarray([prompt]), np.ones(1), []
    for _ in range(steps):
        logits = model(jnp.asarray(prefixes, jnp.int32))[0][:, -1]
        probs = np.asarray(jax.vmap(lambda lv: filtered_probs(lv, temperature, top_k, top_p))(logits), np.float64)
        joint = weights[:, None] * probs
        out.append(joint.sum(0))
        prefixes = np.concatenate([np.repeat(prefixes, v, 0), np.tile(np.arange(v), len(prefixes))[:, None]], 1)
        weights = joint.reshape(-1)
    return out


def test_sampled_speculation_matches_the_model_distribution_end_to_end():
    """3,000 seeded requests on a 12-token vocabulary with two drafts a step: each generated
    token's empirical distribution against the model's exact one (chi-square)."""
    cfg = load("tiny", ["model.vocab_size=12", "model.mtp_depth=1", "model.init_std=0.2"])
    model = init_model(cfg.model, seed=3)
    prompt, n, sampling = [1, 5, 2], 3000, dict(temperature=1.0, top_k=10, top_p=0.95)
    engine = Engine(model, serve(cfg, speculative_tokens=2, max_batch=64, num_pages=128, page_size=8))
    results = engine.generate([Request(str(i), prompt, max_tokens=3, seed=i, index=i, **sampling) for i in range(n)])
    tokens = np.asarray([r.tokens for r in results])
    assert engine.speculation["accepted"][0] > 0.1 * engine.speculation["proposed"][0]
    for i, probs in enumerate(exact_marginals(model, prompt, 3, **sampling)):
        counts = np.bincount(tokens[:, i], minlength=12)
        keep = probs > 0
        assert counts[~keep].sum() == 0, f"token {i}: drawn outside the filtered set"
        assert stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * n).pvalue > 1e-3, f"token {i}"


def test_speculation_needs_an_mtp_module():
    with pytest.raises(ConfigError, match="serve.speculative_tokens' = 2 needs an MTP module"):
        load("tiny", ["serve.speculative_tokens=2"])
    cfg = load("tiny", ["model.mtp_depth=1", "serve.speculative_tokens=2"])
    with pytest.raises(ValueError, match="this model has none"):
        Engine(init_model(load("tiny").model), cfg)


@pytest.mark.slow
def test_tensor_parallel_speculation_equals_one_device(stride_model, tmp_path):
    """The draft module runs under the serving layout's shardings too (tensor parallel over 2)."""
    from moela.configs.schema import MeshConfig
    from moela.model.checkpoint import load_model, save_params
    from moela.parallel.layout import Layout
    from moela.parallel.mesh import build_mesh

    cfg, model = stride_model
    cfg = serve(cfg, speculative_tokens=2, page_size=8, num_pages=32, max_batch=4)
    save_params(tmp_path, cfg, nnx.state(model))
    layout = Layout.of(build_mesh(MeshConfig(data=1, tensor=2, sequence=1), jax.devices()[:2]), "tp")
    _, sharded = load_model(tmp_path, partitioner=layout)
    rng = np.random.default_rng(2)
    reqs = [
        Request(str(i), [int(t) for t in stride_batch(rng, 1, n)["inputs"][0]], max_tokens=10, index=i)
        for i, n in enumerate((3, 11, 6))
    ]
    want = Engine(model, cfg).generate(reqs)
    engine = Engine(sharded, cfg, partitioner=layout)
    assert [r.tokens for r in engine.generate(reqs)] == [r.tokens for r in want]
    assert engine.speculation["accepted"][0] > 0
