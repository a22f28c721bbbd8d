"""Decode throughput with and without speculative decoding (the MTP draft) on a trained checkpoint.

    python bench/speculative.py --checkpoint runs/small_mtp [--batches 1,8] [--drafts 0,1,2,3]
                                [--new-tokens 64] [--prompt-len 32] [--rounds 3]

Prompts are held-out text: windows of the standard-library files the default corpus keeps for
validation (``data.text_builder.split_files``), tokenised with the run's tokenizer. For each batch
size and draft count the engine generates ``--new-tokens`` greedy tokens per sequence; decode
tokens/s counts the tokens after each sequence's first over the time from the first first token to
the last token (prefill excluded). Settings alternate within each round; medians over rounds. One
JSON line per (batch, drafts): tokens/s, the speedup over no speculation, the acceptance rate of
each draft position, tokens per verification step, and whether the output equals plain decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from moela.parallel.host import fast_allocator

import numpy as np

from moela.data import tokenizer as spm
from moela.data.text_builder import split_files, stdlib_files
from moela.inference.engine import Engine
from moela.inference.scheduler import Request
from moela.model.checkpoint import load_model


def held_out_prompts(checkpoint: Path, count: int, length: int) -> list[list[int]]:
    tok = spm.load(checkpoint / "tokenizer.model")
    root, files = stdlib_files()
    _, validation = split_files(files, root, 2)
    rng = np.random.default_rng(0)
    prompts = []
    while len(prompts) < count:
        text = Path(validation[len(prompts) % len(validation)]).read_text(errors="replace")
        start = int(rng.integers(0, max(1, len(text) - 4000)))
        ids = tok.encode(text[start : start + 4000])
        if len(ids) >= length:
            prompts.append(ids[:length])
    return prompts


def run(model, cfg, prompts, new_tokens: int, drafts: int, step=None):
    """(decode tokens/s, results, engine)."""
    serve = dataclasses.replace(
        cfg.serve,
        speculative_tokens=drafts,
        max_batch=len(prompts),
        max_batched_tokens=max(512, len(prompts) * (1 + drafts)),
        num_pages=len(prompts) * (-(-(len(prompts[0]) + new_tokens + drafts) // 16) + 1) + 8,
        page_size=16,
    )
    engine = Engine(model, dataclasses.replace(cfg, serve=serve), step=step)
    results = engine.generate([Request(str(i), p, new_tokens, index=i) for i, p in enumerate(prompts)])
    first = min(r.token_times[0] for r in results)
    last = max(r.token_times[-1] for r in results)
    return sum(len(r.tokens) - 1 for r in results) / (last - first), results, engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--drafts", default="0,1,2,3")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    add_arguments(parser)
    compare(parser.parse_args())


def compare(args) -> None:
    """The comparison the module docstring describes, from parsed arguments (``bench/serve.py
    --speculative CHECKPOINT`` calls it too)."""
    cfg, model = load_model(args.checkpoint)
    settings = [int(d) for d in args.drafts.split(",")]
    if 0 not in settings:
        settings = [0, *settings]
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = held_out_prompts(args.checkpoint, batch, args.prompt_len)
        _, plain, engine = run(model, cfg, prompts, args.new_tokens, 0)  # compiles; the reference output
        step = engine.compiled
        speeds: dict[int, list[float]] = {d: [] for d in settings}
        last: dict[int, tuple] = {}
        for d in settings:  # compile every setting's shapes before timing
            run(model, cfg, prompts, args.new_tokens, d, step)
        for _ in range(args.rounds):
            for d in settings:
                speed, results, engine = run(model, cfg, prompts, args.new_tokens, d, step)
                speeds[d].append(speed)
                last[d] = (results, engine)
        base = statistics.median(speeds[0])
        for d in settings:
            results, engine = last[d]
            summary = engine.speculation_summary() or {}
            line = {
                "bench": "speculative",
                "checkpoint": str(args.checkpoint),
                "batch": batch,
                "drafts": d,
                "new_tokens": args.new_tokens,
                "prompt_len": args.prompt_len,
                "decode_tokens_per_s": round(statistics.median(speeds[d]), 1),
                "samples": [round(s, 1) for s in speeds[d]],
                "speedup": round(statistics.median(speeds[d]) / base, 3),
                "acceptance_rate": summary.get("acceptance_rate"),
                "tokens_per_verify_step": summary.get("tokens_per_verify_step"),
                "steps": engine.steps,
                "equals_plain_greedy": all(a.tokens == b.tokens for a, b in zip(plain, results)),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
