"""Where a training step's time goes: trace a few steps with ``jax.profiler`` and print the
self time of every XLA operation (children subtracted), grouped into matmuls, copies and the
rest, then the top operations. Profile before optimising.

    python bench/profile_train.py [--config bench] [--batch 8] [--seq 256] [--top 25]
                                  [--set model.compute_dtype=bfloat16 ...] [--keep DIR]

Times are per step. XLA's CPU runtime runs independent operations concurrently on the
host's threads, so the sum of self times can exceed the wall-clock step time, and an
operation that overlaps another looks slower than it is alone: compare with the
single-operation benchmarks before drawing conclusions. The trace stays in ``--keep`` for
TensorBoard/Perfetto when given.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from moela.parallel.host import fast_allocator


import jax

from harness import moela_stepper, synthetic_batch
from moela.configs import load

RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "ParseArguments", "while")


def category(name: str) -> str:
    if re.match(r"(ynn_fusion|onednn|xnn_fusion|dot|.*convolution)", name):
        return "matmul"
    return "copy/transpose" if "copy" in name or "transpose" in name else "elementwise/other"


def self_times(trace_file: Path) -> dict[str, tuple[float, int]]:
    """{op name: (summed self time in µs, calls)} from a trace.json.gz."""
    events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    own = collections.defaultdict(float)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[id(stack[-1])] -= e["dur"]
            own[id(e)] += e["dur"]
            stack.append(e)
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if not e["name"].startswith(RUNTIME):
            totals[e["name"]][0] += own[id(e)]
            totals[e["name"]][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", default="", help="directory to keep the trace in")
    args = parser.parse_args()
    cfg = load(args.config, [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}"] + args.set)
    run, _ = moela_stepper(cfg, synthetic_batch(cfg.model.vocab_size, args.batch, args.seq))
    run()
    wall = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        wall.append(time.perf_counter() - t0)
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moela_trace_"))
    with jax.profiler.trace(str(out)):
        for _ in range(args.steps):
            run()
    trace_file = sorted(out.glob("plugins/profile/*/*.trace.json.gz"))[-1]
    ops = self_times(trace_file)
    per_step = {k: (us / args.steps / 1e3, calls / args.steps) for k, (us, calls) in ops.items()}
    groups: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in per_step.items():
        groups[category(name)] += ms
    print(
        json.dumps(
            {
                "bench": "train_step_profile",
                "config": args.config,
                "batch": args.batch,
                "seq": args.seq,
                "step_s_median": round(statistics.median(wall), 4),
                "self_ms_per_step": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda x: -x[1])},
                "trace": str(trace_file),
            }
        )
    )
    for name, (ms, calls) in sorted(per_step.items(), key=lambda x: -x[1][0])[: args.top]:
        print(f"{ms:9.1f} ms/step {calls:6.0f} calls  {category(name):18s} {name}")


if __name__ == "__main__":
    main()
