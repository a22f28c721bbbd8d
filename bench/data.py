"""The streaming loader at corpus scale: memory and time to the first step against corpus size,
and loader throughput against the training step's appetite. Prints one JSON line per measurement.

    python bench/data.py --sizes 50,500 --dir /tmp/moela_bench_data

For each size it generates that many MB of text (Zipf-distributed words in lines and
paragraphs, ~1 MB a file), builds the ``moela_text`` dataset from it once (timed, not part of
the comparison), then runs ``train.py --config tiny`` for a few steps with a tokenizer given
(trained once on the smallest corpus): the peak RSS of the training process and the seconds
from its start to its first logged step. Then it streams rows of the largest corpus in this
process with 0, 1 and 2 worker processes (tokens/s for one host) and compares with the
``tiny`` and ``bench`` presets' training tokens/s on this CPU, and with what a TPU v5p host
(4 chips) needs at a stated tokens/s/chip.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
V5P_PEAK = 459e12  # bf16 FLOP/s per chip (Google Cloud TPU v5p documentation)
ASSUMED_MFU = 0.5  # a well-tuned pod run; the planner's own step-time model supersedes this


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def generate(directory: Path, megabytes: int, seed: int = 0) -> None:
    """At least ``megabytes`` of text, in files of ~1.3 MB (skipped if already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / ".complete"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    letters = np.asarray(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.asarray(["".join(rng.choice(letters, int(rng.integers(2, 10)))) for _ in range(20000)])
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    for f in range(megabytes):
        ids = rng.choice(len(words), 190_000, p=weights)
        lines = [" ".join(words[ids[i : i + 12]]) for i in range(0, len(ids), 12)]
        (directory / f"part{f:05d}.txt").write_text("\n".join(lines) + "\n")
    done.write_text("")


def train_run(corpus: Path, data_dir: Path, tokenizer: str, out: Path, steps: int, preset: str = "tiny") -> dict:
    """Peak RSS (MiB) and time to the first logged step of a train.py run."""
    cmd = [
        sys.executable, "-c",
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r)",
        sys.executable, str(ROOT / "train.py"), "--config", preset,
        "--set", f"data.text_glob={corpus}/*.txt", "--set", f"data.data_dir={data_dir}",
        "--set", f"data.tokenizer_model={tokenizer}", "--set", f"train.out_dir={out}",
        "--set", f"train.steps={steps}", "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000",
        "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics, first = out / "metrics.jsonl", None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.read_text().strip():
            first = time.perf_counter() - start
        time.sleep(0.02)
    maxrss_kb, code = proc.stdout.read().split()[-2:]
    if code != "0":
        raise SystemExit(f"train.py failed on {corpus} (exit {code})")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r][2:]
    return {"peak_rss_mib": round(int(maxrss_kb) / 1024, 1), "first_step_s": round(first, 2),
            "train_tokens_per_s": float(np.median(tps)) if tps else None}  # fmt: skip


def loader_rate(corpus: Path, data_dir: Path, tokenizer: str, workers: int, seconds: float, seq_len=128, batch=8):
    from moela.configs import load
    from moela.data import tokenizer as spm_tokenizer
    from moela.data.pipeline import train_stream
    from moela.data.sources import open_sources

    cfg = load(
        "tiny",
        [f"data.text_glob={corpus}/*.txt", f"data.data_dir={data_dir}", f"data.workers={workers}",
         f"train.seq_len={seq_len}", f"train.global_batch_size={batch}"],
    )  # fmt: skip
    tok = spm_tokenizer.load(tokenizer)
    stream = train_stream(cfg, tok, open_sources(cfg.data, "train"), (0, batch), 1)
    stream.next()  # workers started, first documents read
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += int(stream.next()["loss_mask"].sum())
    rate = tokens / (time.perf_counter() - start)
    stream.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50,500", help="corpus sizes in MB (comma-separated)")
    p.add_argument("--dir", default="/tmp/moela_bench_data", help="where corpora and datasets go (kept)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seconds", type=float, default=20.0, help="per loader-throughput measurement")
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    base = Path(args.dir)
    from moela.data.text_builder import build

    data_dir = base / "tfds"
    for mb in sizes:
        corpus = base / f"corpus_{mb}mb"
        t0 = time.perf_counter()
        generate(corpus, mb)
        t1 = time.perf_counter()
        build(f"{corpus}/*.txt", str(data_dir))
        text_mb = sum(f.stat().st_size for f in corpus.glob("*.txt")) / 1e6
        emit({"bench": "data_prepare", "corpus_mb": mb, "text_mb": round(text_mb, 1), "generate_s": round(t1 - t0, 1),
              "build_s": round(time.perf_counter() - t1, 1)})  # fmt: skip
    from moela.configs import load
    from moela.data.pipeline import get_tokenizer

    small = base / f"corpus_{sizes[0]}mb"
    tok_cfg = load("tiny", [f"data.text_glob={small}/*.txt", f"data.data_dir={data_dir}"])
    tokenizer = get_tokenizer(tok_cfg).path

    for mb in sizes:
        out = base / "runs" / f"tiny_{mb}mb_{int(time.time())}"
        r = train_run(base / f"corpus_{mb}mb", data_dir, tokenizer, out, args.steps)
        emit({"bench": "data_train_memory", "corpus_mb": mb, "steps": args.steps, **r})

    largest = base / f"corpus_{sizes[-1]}mb"
    rates = {}
    for w in (int(x) for x in args.workers.split(",")):
        rates[w] = loader_rate(largest, data_dir, tokenizer, w, args.seconds)
        emit({"bench": "data_loader", "corpus_mb": sizes[-1], "workers": w, "seq_len": 128,
              "tokens_per_s": round(rates[w])})  # fmt: skip

    from moela.model.flops import training_flops_per_token

    step_rates = {}
    for preset, steps in (("tiny", args.steps), ("bench", 6)):
        out = base / "runs" / f"{preset}_rate_{int(time.time())}"
        step_rates[preset] = train_run(small, data_dir, tokenizer, out, steps, preset)["train_tokens_per_s"]
    needs = {}
    for preset in ("deepseek_v2_lite", "deepseek_v3"):
        cfg = load(preset)
        flops = training_flops_per_token(cfg.model, cfg.train.seq_len)["total"]
        needs[preset] = 4 * ASSUMED_MFU * V5P_PEAK / flops
    emit({
        "bench": "data_loader_vs_step", "loader_tokens_per_s": {str(k): round(v) for k, v in rates.items()},
        "train_tokens_per_s": step_rates,
        "loader_over_train": {k: round(min(rates.values()) / v, 1) for k, v in step_rates.items()},
        "v5p_host_needs_tokens_per_s": {k: round(v) for k, v in needs.items()},
        "v5p_host_over_loader": {k: round(v / max(rates.values()), 3) for k, v in needs.items()},
        "v5p_assumption": f"4 chips x {ASSUMED_MFU:.0%} MFU x {V5P_PEAK / 1e12:.0f} TFLOP/s / training FLOPs per token",
    })  # fmt: skip


if __name__ == "__main__":
    main()
