"""The serving engine and the serving half of the one forward: absorbed MLA against the expanded
layer, the model's paged step against its training forward (stacked and serving layouts),
generation against the training forward's argmax and a no-cache greedy loop (mixed batches,
chunked prefill, preemption), sampling, stopping, the scheduler and the allocator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moela.configs import load
from moela.configs.schema import AttentionConfig, RuntimeConfig, ServeConfig
from moela.inference.engine import Batch, Engine, greedy_reference
from moela.inference.pages import OutOfPages, PageAllocator
from moela.inference.sampling import SamplingArrays, sample
from moela.inference.scheduler import Request, Scheduler, Sequence
from moela.kernels import grouped
from moela.model.attention import MLA
from moela.model.cache import bytes_per_token, init_pool
from moela.model.rope import Rotary
from moela.model.runtime import Runtime
from moela.model.transformer import init_model, to_serving_layout

GQA = AttentionConfig(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=16)


REFERENCE = Runtime(RuntimeConfig(paged_attention="reference"))


def tiny(kind="mla", init_std=0.02, paged_attention="auto", **serve):
    cfg = load("tiny")
    model_cfg = cfg.model if kind == "mla" else dataclasses.replace(cfg.model, attention=GQA)
    model_cfg = dataclasses.replace(model_cfg, init_std=init_std)
    return dataclasses.replace(
        cfg, model=model_cfg, serve=ServeConfig(**serve), runtime=RuntimeConfig(paged_attention=paged_attention)
    )


def one_sequence_batch(start: int, stop: int, page_size: int, pages: list[int]) -> Batch:
    pos = np.arange(start, stop, dtype=np.int32)
    pages_np = np.asarray(pages, np.int32)
    slots = pages_np[pos // page_size] * page_size + pos % page_size
    return Batch(
        jnp.zeros(stop - start, jnp.int32),
        jnp.asarray(pos),
        jnp.asarray(slots),
        jnp.asarray([stop]),
        jnp.asarray(pages_np[None]),
        jnp.asarray([0, stop - start]),
        jnp.int32(1),
        jnp.asarray([stop - start - 1]),
    )


@pytest.mark.slow
def test_absorbed_mla_equals_expanded_attention_in_float32():
    cfg = tiny(init_std=0.3).model  # large weights: scores spread, so a wrong absorption shows
    attn = MLA(cfg.attention, cfg.rope, cfg.ctx, rngs=nnx.Rngs(0))
    t, page = 23, 4
    x_btd = jax.random.normal(jax.random.key(1), (1, t, cfg.d_model))
    cos, sin = Rotary(cfg.rope, cfg.attention.rope_dim).tables(jnp.arange(t)[None])
    expanded_td = attn(x_btd, cos, sin)[0][0]
    pool = jnp.full((1, 8, page, 1, cfg.attention.kv_lora_rank + cfg.attention.qk_rope_head_dim), jnp.nan)
    pages = [5, 2, 7, 0, 3, 6]
    # the first 10 tokens as one chunk, then the other 13 attending to them through the cache
    first, cache = attn(
        x_btd[:, :10], cos[:, :10], sin[:, :10], rt=REFERENCE, cache=one_sequence_batch(0, 10, page, pages).cache(pool)
    )
    rest, _ = attn(
        x_btd[:, 10:],
        cos[:, 10:],
        sin[:, 10:],
        rt=REFERENCE,
        cache=one_sequence_batch(10, t, page, pages).cache(cache.pool),
    )
    absorbed_td = jnp.concatenate([first[0], rest[0]])
    assert float(jnp.std(expanded_td)) > 0.1
    np.testing.assert_allclose(np.asarray(absorbed_td), np.asarray(expanded_td), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,layout",
    [
        ("mla", "serving"),
        ("mla", "stacked"),
        ("gqa", "serving"),
    ],
)
def test_serve_step_logits_equal_training_forward(kind, layout):
    """One forward: the model's paged step over a prefill chunk, one decode-like token and the rest
    gives the logits its training forward gives on the whole sequence, in the serving layout
    (unrolled layers, LM head rows) and in the training one (a scan carrying the cache)."""
    cfg = tiny(kind, init_std=0.1).model
    model = init_model(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 19)
    want = np.asarray(model(jnp.asarray(tokens[None]))[0][0])
    runner = to_serving_layout(model) if layout == "serving" else model
    step = nnx.jit(lambda m, b, pool: m.serve_step(b.tokens, b.positions, b.cache(pool), b.last_index, rt=REFERENCE))
    pool = init_pool(cfg, 8, 4)
    pages = [3, 1, 6, 0, 7]
    got = []
    for start, stop in [(0, 7), (7, 8), (8, 19)]:  # prefill chunk, one decode-like token, the rest
        batch = one_sequence_batch(start, stop, 4, pages)
        batch.tokens = jnp.asarray(tokens[start:stop], jnp.int32)
        logits, cache = step(runner, batch, pool)
        pool = cache.pool
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(got), want[[6, 7, 18]], atol=1e-4, rtol=1e-4)


def prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@nnx.jit
def forward_argmax(model, tokens_bt):
    return jnp.argmax(model(tokens_bt)[0], axis=-1)


def training_argmax(model, tokens: list[int], length: int = 48) -> list[int]:
    """The training forward's next-token argmax after every position of ``tokens``: one forward,
    padded to a fixed length (causal, so the padding changes nothing before it: one compile)."""
    padded = np.zeros((1, length), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(forward_argmax(model, jnp.asarray(padded)))[0, : len(tokens)].tolist()


@pytest.mark.parametrize("kind", ["mla", pytest.param("gqa", marks=pytest.mark.slow)])
def test_engine_tokens_are_the_training_forward_argmax_with_chunks_and_preemption(kind):
    """One forward: prefill (in chunks), decode, preemption and recomputation through the engine's
    paged step give, token for token, the argmax of the training forward over the prompt and the
    tokens generated before. 14 pages of 4 tokens cannot hold all six sequences, so the newest get
    preempted and recomputed; a 16-token budget splits the 30-token prompt into chunks."""
    cfg = tiny(kind, init_std=0.1, page_size=4, num_pages=14, max_batch=4, max_batched_tokens=16)
    model = init_model(cfg.model, seed=1)
    reqs = [
        Request(str(i), p, max_tokens=12, index=i)
        for i, p in enumerate(prompts(cfg.model.vocab_size, [3, 17, 9, 30, 1, 12]))
    ]
    engine = Engine(model, cfg)
    results = engine.generate(reqs)
    assert engine.scheduler.preemptions > 0 and engine.allocator.peak_used == 14
    assert [r.id for r in results] == [r.id for r in reqs]
    for r in results:
        prompt = reqs[r.index].tokens
        assert r.finish_reason == "length" and len(r.tokens) == 12
        assert r.tokens == training_argmax(model, prompt + r.tokens)[len(prompt) - 1 : -1], f"request {r.id}"
    assert engine.allocator.used == 0, "finished sequences must free their pages"


@pytest.mark.parametrize("routing", ["uniform", "one_expert_busy"])
@pytest.mark.parametrize("tokens", [8, 32])
def test_serving_expert_paths_equal_a_per_token_loop(tokens, routing):
    """Both ways a serving step computes the routed experts (every expert on C of its own rows,
    the grouped matmul) against a per-token NumPy loop, with
    padding tokens that must come out zero. ``one_expert_busy`` routes every token to expert 3,
    so the capacity path must pick C = T (nothing dropped)."""
    rng = np.random.default_rng(tokens)
    e, k, d, f = 8, 2, 16, 8
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    wg, wu = (rng.standard_normal((e, d, f)).astype(np.float32) / 4 for _ in range(2))
    wd = rng.standard_normal((e, f, d)).astype(np.float32) / 3
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if routing == "one_expert_busy":
        ids[:, 0] = 3
        ids[:, 1] = np.where(ids[:, 1] == 3, 5, ids[:, 1])
    weights = rng.random((tokens, k)).astype(np.float32)
    real = np.arange(tokens) < tokens - 3
    want = np.zeros_like(x)
    for i in np.flatnonzero(real):
        for j in range(k):
            h = x[i] @ wg[ids[i, j]]
            want[i] += weights[i, j] * ((h / (1 + np.exp(-h))) * (x[i] @ wu[ids[i, j]])) @ wd[ids[i, j]]
    ids = np.where(real[:, None], ids, e)  # padding routes to no expert
    args = tuple(jnp.asarray(a) for a in (x, weights, ids, wg, wu, wd))
    for name, fn in [
        ("capacity", grouped.capacity_swiglu),
        ("grouped", lambda *a: grouped.routed_swiglu(*a, backend="auto", block=8)),
    ]:
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), want, atol=1e-5, rtol=1e-4, err_msg=name)
    assert grouped.capacities(32, 2, 16) == (4, 8, 16, 32) and grouped.capacities(8, 2, 16) == (4, 8)
    assert grouped.capacities(128, 2, 16) == (16, 32, 64, 128)  # never below the mean load


@pytest.mark.slow
def test_sampling_is_seeded_per_request_whatever_the_batch():
    cfg = tiny(page_size=4, num_pages=64, max_batch=4, max_batched_tokens=32)
    model = init_model(cfg.model, seed=1)
    p = prompts(cfg.model.vocab_size, [5, 9, 14, 3], seed=3)
    base = dict(max_tokens=10, temperature=1.5, top_k=50, top_p=0.95)
    first = Engine(model, cfg)  # a fresh engine per generation, all sharing its compiled step
    alone = first.generate([Request("x", p[0], seed=7, **base)])[0].tokens
    crowd = [Request("x", p[0], seed=7, **base)] + [Request(str(i), q, seed=i, **base) for i, q in enumerate(p[1:])]
    together = Engine(model, cfg, step=first.compiled).generate(crowd)
    assert together[0].tokens == alone
    other_seed = Engine(model, cfg, step=first.compiled).generate([Request("x", p[0], seed=8, **base)])[0].tokens
    assert other_seed != alone
    top1 = Engine(model, cfg, step=first.compiled).generate(
        [Request("x", p[0], seed=7, max_tokens=10, temperature=1.5, top_k=1)]
    )
    assert top1[0].tokens == greedy_reference(model, p[0], 10)


def test_sample_filters_and_distribution():
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]] * 4000))
    n = logits.shape[0]

    def draw(temperature, top_k, top_p):
        params = SamplingArrays(
            jnp.full(n, temperature, jnp.float32),
            jnp.full(n, top_k, jnp.int32),
            jnp.full(n, top_p, jnp.float32),
            jnp.arange(n, dtype=jnp.uint32),
            jnp.zeros(n, jnp.int32),
        )
        return np.bincount(np.asarray(jax.jit(sample)(logits, params)), minlength=4) / n

    np.testing.assert_allclose(draw(1.0, 0, 1.0), [0.1, 0.4, 0.2, 0.3], atol=0.03)
    np.testing.assert_allclose(draw(1.0, 2, 1.0), [0, 4 / 7, 0, 3 / 7], atol=0.03)
    np.testing.assert_allclose(draw(1.0, 0, 0.65), [0, 4 / 7, 0, 3 / 7], atol=0.03)  # 0.4 + 0.3 >= 0.65
    np.testing.assert_allclose(draw(0.0, 0, 1.0), [0, 1, 0, 0])
    np.testing.assert_allclose(draw(1.0, 0, 0.01), [0, 1, 0, 0])


class Letters:
    """A stand-in tokenizer: token i is one letter; eos_id -1 (none)."""

    eos_id = -1

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_eos_end_generation():
    cfg = tiny(page_size=4, num_pages=64, max_batch=4, max_batched_tokens=32)
    model = init_model(cfg.model, seed=1)
    prompt = prompts(cfg.model.vocab_size, [6])[0]
    greedy = greedy_reference(model, prompt, 8)
    text = Letters().decode(greedy)
    stop = text[3:5]
    cut = text.find(stop)
    engine = Engine(model, cfg, Letters())
    r = engine.generate([Request("s", prompt, 8, stop=(stop,))])[0]
    assert r.finish_reason == "stop" and r.text == text[:cut] and r.tokens == greedy[: cut + 2]
    eos_cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, eos_id=greedy[4]))
    r = Engine(model, eos_cfg, step=engine.compiled).generate([Request("e", prompt, 8)])[0]
    first = greedy.index(greedy[4])
    assert r.finish_reason == "stop" and r.tokens == greedy[:first]


def test_requests_that_cannot_run_are_refused_with_a_reason():
    cfg = tiny(page_size=4, num_pages=4)
    engine = Engine(init_model(cfg.model), cfg)
    assert "empty" in engine.check(Request("a", [], 4))
    assert "context" in engine.check(Request("a", [1] * 256, 4))
    assert "token ids" in engine.check(Request("a", [1, 5000], 4))
    assert "pages" in engine.check(Request("a", [1] * 10, 20))
    assert engine.check(Request("a", [1] * 10, 6)) is None


def test_scheduler_budget_order_and_preemption():
    alloc = PageAllocator(num_pages=6, page_size=4)
    sched = Scheduler(alloc, max_seqs=3, max_tokens=10)
    seqs = [Sequence(i, Request(str(i), [1] * n, 5), arrival=i) for i, n in enumerate([6, 13, 2, 3])]
    for s in seqs:
        sched.add(s)
    chunks = sched.plan()  # 6 tokens of seq 0, then 4 of seq 1's 13; seq 2 waits (no budget left)
    assert [(c.seq.seq_id, c.start, c.length, c.samples) for c in chunks] == [(0, 0, 6, True), (1, 0, 4, False)]
    sched.advance(chunks)
    seqs[0].generated.append(9)
    chunks = sched.plan()  # the decode of 0 first, then 9 more of seq 1; no budget left to admit seq 2
    assert [(c.seq.seq_id, c.start, c.length) for c in chunks] == [(0, 6, 1), (1, 4, 9)]
    sched.advance(chunks)
    assert alloc.used == 2 + 4  # seq 0: 7 rows in 2 pages; seq 1: 13 rows in 4 pages
    seqs[0].generated += [9, 9]  # seq 0 now needs a third page: none is free, so the newest (1) is preempted
    seqs[1].generated.append(9)
    chunks = sched.plan()
    assert seqs[1].preemptions == 1 and sched.preemptions == 1
    # seq 1 re-enters first from the queue (arrival order) and recomputes prompt + generated from 0
    assert [(c.seq.seq_id, c.start, c.length) for c in chunks] == [(0, 7, 2), (1, 0, 8)]
    assert list(sched.waiting) == [seqs[2], seqs[3]]


def test_page_allocator_free_list():
    alloc = PageAllocator(num_pages=4, page_size=8)
    assert alloc.reserve(1, 9) == [0, 1] and alloc.reserve(2, 8) == [2]
    assert alloc.reserve(1, 16) == [0, 1]  # already enough
    with pytest.raises(OutOfPages):
        alloc.reserve(2, 24)
    assert alloc.pages[2] == [2], "a failed reservation takes nothing"
    np.testing.assert_array_equal(alloc.slots(1, 6, 10), [6, 7, 8, 9])
    alloc.release(1)
    assert alloc.free == 3 and alloc.peak_used == 3
    assert alloc.reserve(3, 1) == [0]


def test_latent_cache_is_smaller_than_expanded_kv():
    cfg = load("bench").model
    b = bytes_per_token(cfg)
    assert b["stored"] == 6 * (128 + 32) * 4 and b["expanded_kv"] == 6 * 8 * (96 + 64) * 4


def engine_through(impl: str, **serve):
    cfg = tiny(
        init_std=0.1, paged_attention=impl, page_size=8, num_pages=32, max_batch=4, max_batched_tokens=16, **serve
    )
    model = init_model(cfg.model, seed=1)
    reqs = [Request(str(i), p, max_tokens=5, index=i) for i, p in enumerate(prompts(cfg.model.vocab_size, [3, 21, 9]))]
    for r in Engine(model, cfg).generate(reqs):
        assert r.tokens == greedy_reference(model, reqs[r.index].tokens, 5), f"{impl}: request {r.id} diverged"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["interpret", "interpret_gpu"])
def test_engine_through_the_interpreted_kernels_equals_no_cache_loop(impl):
    engine_through(impl)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU")
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_engine_on_gpu_with_the_compiled_kernel(cache_dtype):
    if cache_dtype == "float32":
        engine_through("pallas")
    else:  # a bfloat16 cache changes numerics: check the step runs and produces full-length output
        cfg = tiny(init_std=0.1, paged_attention="pallas", page_size=16, num_pages=32, cache_dtype="bfloat16")
        out = Engine(init_model(cfg.model), cfg).generate([Request("a", [1, 2, 3], 4)])
        assert len(out[0].tokens) == 4


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "interpret_gpu"])
def test_tensor_parallel_engine_equals_one_device(impl, tmp_path):
    from moela.configs.schema import MeshConfig
    from moela.model.checkpoint import load_model, save_params
    from moela.parallel.layout import Layout
    from moela.parallel.mesh import build_mesh

    cfg = tiny(init_std=0.1, paged_attention=impl, page_size=8, num_pages=32, max_batch=4, max_batched_tokens=16)
    model = init_model(cfg.model, seed=1)
    save_params(tmp_path, cfg, nnx.state(model))
    layout = Layout.of(build_mesh(MeshConfig(data=1, tensor=2, sequence=1), jax.devices()[:2]), "tp")
    _, sharded = load_model(tmp_path, partitioner=layout)
    assert "tensor" in str(sharded.dense_blocks.attn.wo[...].sharding.spec)
    reqs = [Request(str(i), p, max_tokens=6, index=i) for i, p in enumerate(prompts(cfg.model.vocab_size, [3, 21, 9]))]
    engine = Engine(sharded, cfg, partitioner=layout)
    got = engine.generate(reqs)
    for r in got:
        assert r.tokens == greedy_reference(model, reqs[r.index].tokens, 6), f"request {r.id} diverged"
