"""Batch generation from a moela checkpoint (a training run or an imported DeepSeek model).

    python serve.py --checkpoint DIR --prompts prompts.jsonl --out completions.jsonl \
        [--set serve.max_batch=32 --set runtime.paged_attention=xla --set mesh.tensor=2 ...] [--resume]

Input: one request per line, JSON ``{"id", "prompt" | "tokens", "max_tokens", "temperature",
"top_p", "top_k", "seed", "stop"}`` (missing fields take ``serve.*`` config defaults) or plain
text; a line starting with ``{`` or ``[`` is JSON and must be an object (``inference.requests``).
Output: one JSON record per request, written as each finishes and re-sorted into input order at
the end; bad lines get ``{"id", "index", "error"}`` records. ``--resume`` skips ids
already in the output. A summary (throughput, TTFT / ITL percentiles, peak pages) is printed as
one JSON line at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from moela.configs import Config, ConfigError, MeshConfig, RuntimeConfig, apply_overrides, validate
from moela.data.text_builder import DataError
from moela.inference.engine import Engine
from moela.inference.requests import OutputWriter, Problem, load_tokenizer, parse_line, read_done, read_lines
from moela.model.checkpoint import CheckpointError, load_config, load_model
from moela.model.runtime import ONE_DEVICE, Partitioner
from moela.parallel.layout import Layout
from moela.parallel.mesh import MeshError, build_mesh
from moela.parallel.rules import ShardingRuleError

SETTABLE = ("serve.", "runtime.", "mesh.")  # the model is the checkpoint's; how it is served is ours


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    values = np.asarray(values, np.float64)
    return {f"p{q}": (round(float(np.percentile(values, q)), 6) if values.size else None) for q in qs}


def serving_config(checkpoint_cfg: Config, overrides: list[str]) -> Config:
    """The checkpoint's config with serving's own ``runtime`` and ``mesh`` (defaults: the backends'
    ``auto`` and one device, not whatever the training run used) and the ``--set`` overrides."""
    bad = [item for item in overrides if not item.startswith(SETTABLE)]
    if bad:
        raise ConfigError(
            f"--set may change only {', '.join(k + '*' for k in SETTABLE)} keys (the model is the "
            f"checkpoint's); got {', '.join(bad)}"
        )
    cfg = dataclasses.replace(checkpoint_cfg, runtime=RuntimeConfig(), mesh=MeshConfig(data=1))
    return validate(apply_overrides(cfg, overrides))


def serving_partitioner(cfg: Config) -> Partitioner:
    """One device, or the mesh of ``mesh.*`` (built like train.py's) when it spans more. Serving
    splits the model, never its packed batch: ``mesh.data`` and ``mesh.sequence`` must be 1."""
    sizes = (cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.sequence)
    devices = jax.devices() if -1 in sizes else jax.devices()[: math.prod(sizes)]
    try:
        mesh = build_mesh(cfg.mesh, devices)
        if mesh.shape["data"] != 1 or mesh.shape["sequence"] != 1:
            raise MeshError(
                f"serving runs one packed batch of sequences, so mesh.data and mesh.sequence must be 1 "
                f"(got {dict(mesh.shape)}); split the model with mesh.tensor=N and mesh.strategy=tp"
            )
        return ONE_DEVICE if mesh.size == 1 else Layout.of(mesh, cfg.mesh.strategy)
    except (MeshError, ShardingRuleError) as e:
        raise ConfigError(f"mesh: {e}") from None


def build_engine(args) -> tuple[Engine, Config]:
    cfg = serving_config(load_config(args.checkpoint), args.set)
    partitioner = serving_partitioner(cfg)
    _, model = load_model(args.checkpoint, args.step, partitioner)
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    return Engine(model, cfg, tokenizer, partitioner), cfg


def record(result) -> dict:
    return {
        "id": result.id,
        "index": result.index,
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.tokens),
        "ttft_s": round(result.ttft_s, 6),
        "tpot_s": None if result.tpot_s is None else round(result.tpot_s, 6),
        "preemptions": result.preemptions,
    }


def check_out(out: Path, resume: bool) -> None:
    """Refuse an --out that cannot be written, or that holds completions without --resume, before
    any model is loaded."""
    if out.is_dir():
        raise ValueError(f"--out '{out}' is a directory; give a file path for the JSONL completions")
    if not resume and out.exists() and out.stat().st_size:
        raise ValueError(f"'{out}' already holds completions; pass --resume to continue it or choose another --out")
    parent = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists() or p == p.parent)
    if parent != out.absolute() and not parent.is_dir():
        raise ValueError(f"cannot write --out '{out}': '{parent}' is a file, not a directory")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise ValueError(f"cannot write --out '{out}': permission denied")


def serve(args) -> dict:
    lines = read_lines(args.prompts)
    out = Path(args.out)
    check_out(out, args.resume)
    engine, cfg = build_engine(args)
    done = read_done(out) if args.resume else []
    try:
        writer = OutputWriter(out, done)
    except OSError as e:
        raise ValueError(f"cannot write --out '{out}': {e.strerror or e}") from None
    done = {str(r["id"]) for r in done}
    requests, errors, seen = [], 0, set(done)
    skipped = 0
    for index, line in enumerate(lines):
        item = parse_line(line, index, cfg.serve, engine.tokenizer)
        if item is None:
            continue
        if item.id in done:
            skipped += 1
            continue
        if isinstance(item, Problem) or item.id in seen:
            problem = item if isinstance(item, Problem) else Problem(item.id, index, f"duplicate id {item.id!r}")
            writer.write(problem.record())
            errors += 1
            seen.add(item.id)
            continue
        seen.add(item.id)
        reason = engine.check(item)
        if reason:
            writer.write(Problem(item.id, index, reason).record())
            errors += 1
            continue
        requests.append(item)

    start = time.perf_counter()
    prompt_tokens = sum(len(r.tokens) for r in requests)
    generated, ttfts, itls = 0, [], []
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=args.quiet, file=sys.stderr)

    def on_step(eng):
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(
            f"{generated / max(elapsed, 1e-9):.1f} tok/s, pages {eng.allocator.used}/{eng.allocator.num_pages}",
            refresh=False,
        )

    try:
        for result in engine.run(requests, on_step=on_step):
            writer.write(record(result))
            generated += len(result.tokens)
            ttfts.append(result.ttft_s)
            itls.extend(np.diff(result.token_times).tolist())
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    wall = time.perf_counter() - start
    speculation = engine.speculation_summary()
    return {
        "requests": len(requests),
        "errors": errors,
        "skipped": skipped,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "generated_tokens_per_s": round(generated / wall, 2) if wall else None,
        "total_tokens_per_s": round((generated + prompt_tokens) / wall, 2) if wall else None,
        "ttft_s": percentiles(ttfts),
        "itl_s": percentiles(itls),
        "steps": engine.steps,
        "peak_pages": engine.allocator.peak_used,
        "num_pages": engine.allocator.num_pages,
        "preemptions": engine.scheduler.preemptions,
        "compiled_shapes": len(engine.compiled_shapes),
        **({"speculation": speculation} if speculation else {}),
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="moela checkpoint dir (train.py run or hf_import output)")
    parser.add_argument("--prompts", required=True, help="JSONL requests or plain-text prompts, one per line")
    parser.add_argument("--out", required=True, help="JSONL completions to write")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a serve.*, runtime.* or mesh.* override, e.g. serve.max_batch=32 (repeatable)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model / tokenizer.json (default: the checkpoint's)"
    )
    parser.add_argument("--resume", action="store_true", help="keep --out and skip the ids already in it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = serve(args)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def entry() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
