"""Serving throughput on the ``bench`` preset (float32, CPU): the paged engine against a
memory-bandwidth roofline, transformers' DeepseekV3 ``generate`` and a no-cache greedy loop.

    python bench/serve.py [--batches 1,8,32,64] [--prompt-len 128] [--decode-steps 16]
                          [--rounds 3] [--no-torch] [--no-nocache] [--nocache-tokens 256]
    python bench/serve.py --speculative runs/small_mtp --batches 1,8 [--drafts 0,1,2,3]

With ``--speculative CHECKPOINT`` (a run trained with ``model.mtp_depth``) it compares greedy
decode tokens/s with and without speculative decoding instead (``bench/speculative.py``).

Prints one JSON line per measurement:

* ``bandwidth``: a jitted sum over 256 MB, measured first (the roofline's denominator).
* ``kv_bytes``: cache bytes per token, MLA latent rows vs the expanded per-head K/V.
* ``prefill``: one 512-token prompt in one step, tokens/s.
* ``decode`` per batch size: the median step time once every sequence decodes (prompt
  ``--prompt-len``), tokens/s, and the roofline: bytes a step must read (every weight, the
  experts the batch is expected to touch, the batch's cache rows) over the bandwidth.
* ``vs_transformers`` (batch 8, prompts of 128 and 1024 tokens): decode tokens/s of both,
  alternating rounds: moela's from the median decode step (as ``decode``), transformers' from
  generate(1 + n new tokens) minus generate(1), so its prefill cancels out; the median ratio.
* ``vs_no_cache`` (batch 1): 256 greedy tokens through the engine vs re-running the whole
  sequence for every token (``inference.engine.greedy_reference``), same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from moela.parallel.host import active_allocator, fast_allocator


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moela.configs import load
from moela.configs.schema import ServeConfig
from moela.model.cache import bytes_per_token
from moela.inference.engine import Engine, greedy_reference
from moela.inference.scheduler import Request
from moela.model.transformer import init_model

import speculative


def emit(kind: str, **fields) -> dict:
    line = {"bench": "serve", "kind": kind, **fields}
    print(json.dumps(line), flush=True)
    return line


def measure_bandwidth(mbytes: int = 256, repeats: int = 7) -> float:
    """Bytes/s of a jitted float32 sum over ``mbytes`` MB (median)."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times)


def step_weight_bytes(model, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` tokens must read: every weight once, except the
    embedding table (``batch`` rows) and routed experts (those the batch is expected to touch
    under uniform routing: E·(1 - (1 - k/E)^batch) per layer)."""
    cfg = model.cfg
    e, k = cfg.moe.num_experts, cfg.moe.experts_per_token
    touched = 1.0 if not e else (1 - (1 - k / e) ** batch)
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = "/".join(str(getattr(p, "key", p)) for p in path)
        nbytes = leaf.size * leaf.dtype.itemsize
        if names.startswith("embed/") and cfg.tie_embeddings is False:
            nbytes = batch * cfg.d_model * leaf.dtype.itemsize
        elif "/experts/" in names:
            nbytes *= touched
        total += nbytes
    return total


def serve_cfg(base, batch: int, tokens: int):
    pages = batch * -(-tokens // 16) + 8
    return dataclasses.replace(
        base, serve=ServeConfig(page_size=16, num_pages=pages, max_batch=max(batch, 1), max_batched_tokens=512)
    )


def decode_steps(model, cfg, batch: int, prompt_len: int, steps: int) -> tuple[list[float], int]:
    """Wall time between consecutive engine steps once all ``batch`` sequences decode (host work
    included: what a user waits); the workload runs twice and the second, compiled, is timed.
    Also returns the mean context length."""
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, cfg.model.vocab_size, prompt_len).tolist() for _ in range(batch)]
    compiled = None
    for _ in range(2):
        engine = Engine(model, serve_cfg(cfg, batch, prompt_len + steps + 4), step=compiled)
        compiled = engine.compiled
        marks: list[tuple[float, bool]] = []

        def on_step(eng):
            decoding = not eng.scheduler.waiting and all(s.computed == s.length - 1 for s in eng.scheduler.running)
            marks.append((time.perf_counter(), decoding))

        for _ in engine.run([Request(str(i), p, steps + 1, index=i) for i, p in enumerate(prompts)], on_step=on_step):
            pass
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:]) if a[1] and b[1]]
    return times, prompt_len + steps // 2


def moela_generate_time(model, cfg, prompts: list[list[int]], new_tokens: int, capacity: int, step=None):
    """(wall time of ``Engine.generate``, the engine's compiled step). A fresh cache of ``capacity``
    tokens per sequence: the same shapes whatever ``new_tokens``, so with the compiled step of an
    earlier call (``step``) nothing recompiles."""
    engine = Engine(model, serve_cfg(cfg, len(prompts), capacity), step=step)
    reqs = [Request(str(i), p, new_tokens, index=i) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    engine.generate(reqs)
    return time.perf_counter() - t0, engine.compiled


def hf_model_for(cfg):
    import torch
    import transformers

    from moela.model.hf_import import hf_config_kwargs

    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg.model))
    torch.set_num_threads(2)
    return transformers.DeepseekV3ForCausalLM(hf_cfg).eval()


def hf_generate_time(hf_model, prompts: list[list[int]], new_tokens: int) -> float:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            use_cache=True,
        )
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf-tokens", type=int, default=32, help="decode tokens per generate() in the comparison")
    parser.add_argument(
        "--hf-prompt-lens",
        default="128,1024",
        help="prompt lengths of the transformers comparison (its per-step cost grows with context)",
    )
    parser.add_argument("--nocache-tokens", type=int, default=256)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-nocache", action="store_true")
    parser.add_argument("--speculative", type=Path, help="a checkpoint with MTP: compare decoding with drafts")
    parser.add_argument("--drafts", default="0,1,2,3", help="draft counts for --speculative")
    args = parser.parse_args()
    if args.speculative is not None:
        speculative.compare(
            argparse.Namespace(
                checkpoint=args.speculative,
                batches=args.batches,
                drafts=args.drafts,
                new_tokens=64,
                prompt_len=32,
                rounds=args.rounds,
            )
        )
        return
    cfg = load("bench")
    model = init_model(cfg.model, seed=0)
    bandwidth = measure_bandwidth()
    emit("bandwidth", bytes_per_s=round(bandwidth), allocator=active_allocator(), platform=jax.default_backend())
    kv = bytes_per_token(cfg.model)
    emit(
        "kv_bytes",
        per_token_latent=kv["stored"],
        per_token_expanded_kv=kv["expanded_kv"],
        ratio=round(kv["expanded_kv"] / kv["stored"], 2),
    )

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.model.vocab_size, args.prefill_len).tolist()
    engine = Engine(model, serve_cfg(cfg, 1, args.prefill_len + 1))
    times = []
    for _ in range(args.rounds + 1):
        engine.submit(Request("p", prompt, 1))
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        engine.scheduler.finish(engine.scheduler.running[0])
    emit(
        "prefill",
        tokens=args.prefill_len,
        step_s=round(statistics.median(times[1:]), 4),
        tokens_per_s=round(args.prefill_len / statistics.median(times[1:]), 1),
    )

    for batch in [int(b) for b in args.batches.split(",")]:
        times, context = decode_steps(model, cfg, batch, args.prompt_len, args.decode_steps)
        step = statistics.median(times)
        weights = step_weight_bytes(model, batch)
        cache = batch * context * kv["stored"]
        floor = (weights + cache) / bandwidth
        emit(
            "decode",
            batch=batch,
            context=context,
            step_s=round(step, 5),
            tokens_per_s=round(batch / step, 1),
            bytes_per_step=round(weights + cache),
            roofline_step_s=round(floor, 5),
            x_roofline=round(step / floor, 2),
        )

    if not args.no_torch:
        hf_model = hf_model_for(cfg)
        n = args.hf_tokens
        for prompt_len in [int(p) for p in args.hf_prompt_lens.split(",")]:
            prompts = rng.integers(0, cfg.model.vocab_size, (8, prompt_len)).tolist()
            hf_generate_time(hf_model, prompts, 2)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(8 / statistics.median(decode_steps(model, cfg, 8, prompt_len, n)[0]))
                theirs.append(
                    8 * n / (hf_generate_time(hf_model, prompts, 1 + n) - hf_generate_time(hf_model, prompts, 1))
                )
            emit(
                "vs_transformers",
                batch=8,
                prompt=prompt_len,
                new_tokens=n,
                moela_decode_tokens_per_s=round(statistics.median(ours), 1),
                transformers_decode_tokens_per_s=round(statistics.median(theirs), 1),
                ratio=round(statistics.median([a / b for a, b in zip(ours, theirs)]), 2),
            )

    if not args.no_nocache:
        n = args.nocache_tokens
        prompt = rng.integers(0, cfg.model.vocab_size, 32).tolist()
        greedy_reference(model, prompt, 2)  # compile
        _, compiled = moela_generate_time(model, cfg, [prompt], n, 32 + n)
        t_engine, _ = moela_generate_time(model, cfg, [prompt], n, 32 + n, step=compiled)
        t0 = time.perf_counter()
        greedy_reference(model, prompt, n)
        t_loop = time.perf_counter() - t0
        emit(
            "vs_no_cache",
            batch=1,
            prompt=32,
            new_tokens=n,
            engine_s=round(t_engine, 2),
            no_cache_s=round(t_loop, 2),
            ratio=round(t_loop / t_engine, 2),
        )


if __name__ == "__main__":
    main()
