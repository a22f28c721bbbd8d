"""Run a planned sweep: train every run of a manifest in turn and append one result row per run.

    python -m moela.scaling run DIR/manifest.json [--shard i/n] [--results DIR/results.jsonl]

Each run is a subprocess ``python -m moela.cli.train --config DIR/configs/<name>.py`` (what
``train.py`` runs; its output in ``<run_dir>/train.log``), not an in-process ``training.loop.run``: every run
starts from a fresh JAX (no compilation caches, device buffers or signal handlers carried from
one model to the next), a crash or out-of-memory kill takes down one run and not the sweep, and
the run is exactly what a person reproduces by hand. It costs a few seconds of start-up a run.

Resuming: rows already in the results file (with a loss and no error) are skipped; an
interrupted run restarts in its ``run_dir`` and the trainer resumes from its last checkpoint.
A failed run appends a row with an ``error`` field (and is retried by the next invocation); the
sweep goes on. A run stopped by SIGTERM (exit 143) saved a checkpoint: the sweep stops there.
``--shard i/n`` takes the runs whose index in the manifest is i mod n, for n machines sharing
one results file (rows are appended with one write each).

Rows (JSONL, and at the end a CSV copy of the latest good row per run) carry ``name, budget, C,
N, D, loss`` in the C = 6·N·D convention of ``scaling.flops`` (N = flops_per_token / 6, D = the
tokens trained, loss = the final validation loss in nats/token) plus ``n_total, n_active,
n_non_embedding, flops_per_token, tokens, steps, batch, lr, layers, d_model, wall_s, run_dir,
convention``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moela.model.flops import SCALING_CONVENTION

PREEMPTED = 143
ROW_KEYS = (
    "name",
    "budget",
    "C",
    "N",
    "D",
    "loss",
    "n_total",
    "n_active",
    "n_non_embedding",
    "flops_per_token",
    "tokens",
    "steps",
    "batch",
    "lr",
    "layers",
    "d_model",
    "wall_s",
    "run_dir",
    "convention",
)


class RunError(ValueError):
    """A manifest, shard or results file that cannot be used; the message says why."""


def load_manifest(path: str | Path) -> tuple[Path, list[dict]]:
    """(plan directory, runs) from a plan directory, ``manifest.json`` or ``manifest.jsonl``."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        if p.suffix == ".jsonl":
            runs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            runs = json.loads(p.read_text())["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunError(f"cannot read manifest '{path}': {e}; give a plan directory or its manifest.json") from None
    for i, r in enumerate(runs):
        missing = [k for k in ("name", "budget", "N", "D", "flops_per_token", "preset", "run_dir") if k not in r]
        if missing:
            raise RunError(
                f"manifest '{p}': run {i} lacks {', '.join(missing)}; re-plan with python -m moela.scaling plan"
            )
    return p.parent, runs


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise RunError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise RunError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def shard(runs: list[dict], i: int, n: int) -> list[dict]:
    return [r for k, r in enumerate(runs) if k % n == i]


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"results file '{path}', line {number}, is not JSON; fix or move it") from None
    return rows


def finished(row: dict) -> bool:
    loss = row.get("loss")
    return not row.get("error") and isinstance(loss, (int, float)) and math.isfinite(loss)


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")  # one write: shards may share the file


def write_csv(results: Path) -> Path:
    """The latest good row per run, as CSV beside the JSONL (replaced atomically)."""
    latest = {r["name"]: r for r in read_rows(results) if finished(r)}
    keys = list(ROW_KEYS) + sorted({k for r in latest.values() for k in r} - set(ROW_KEYS))
    path, tmp = results.with_suffix(".csv"), results.with_suffix(f".csv.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(latest.values())
    tmp.replace(path)
    return path


def train_subprocess(run: dict) -> dict:
    """Train one run with ``train.py``; returns its summary (the last JSON line) plus ``exit_code``."""
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moela.cli.train", "--config", run["preset"]]
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    lines = (run_dir / "train.log").read_text(errors="replace").splitlines()
    summary = {}
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    errors = [line for line in lines if line.startswith("error:") or "Error" in line[:80]]
    if code and errors:
        summary["error"] = errors[-1][:500]
    return {**summary, "exit_code": code}


def final_eval_loss(run_dir: Path, last_step: int) -> float | None:
    """The eval loss logged at ``last_step`` (a run re-launched after it finished reports none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    losses = [
        r["eval_loss"]
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("step") == last_step and "eval_loss" in r
    ]
    return losses[-1] if losses else None


def result_row(run: dict, summary: dict, wall: float) -> dict:
    """One results row in the C = 6·N·D convention; ``error`` set when the run did not finish."""
    row = {
        "name": run["name"],
        "budget": run["budget"],
        "C": run["flops_per_token"] * run["D"],
        "N": run["N"],
        "D": run["D"],
        "loss": None,
        "tokens": run["D"],
        "wall_s": round(wall, 2),
        "run_dir": run["run_dir"],
        "convention": SCALING_CONVENTION,
    }
    row.update(
        {
            k: run.get(k)
            for k in (
                "n_total",
                "n_active",
                "n_non_embedding",
                "flops_per_token",
                "steps",
                "batch",
                "lr",
                "layers",
                "d_model",
            )
        }
    )
    code = summary.get("exit_code", 0)
    loss = summary.get("eval_loss")
    if loss is None and code == 0:
        loss = final_eval_loss(Path(run["run_dir"]), run["steps"] - 1)
    if code != 0:
        row["error"] = summary.get("error") or f"train.py exited with status {code}; see {run['run_dir']}/train.log"
    elif summary.get("flops_per_token") not in (None, run["flops_per_token"]):
        row["error"] = (
            f"the trainer counts {summary['flops_per_token']} FLOPs per token, the plan "
            f"{run['flops_per_token']}: re-plan with this code"
        )
    elif loss is None or not math.isfinite(loss):
        row["error"] = f"no final eval loss (got {loss!r}); see {run['run_dir']}/train.log"
    else:
        row["loss"] = loss
    return row


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def run_sweep(
    manifest: str | Path,
    shard_spec: str | None = None,
    results: str | Path | None = None,
    trainer: Callable[[dict], dict] = train_subprocess,
    log=print,
) -> dict:
    """Train the shard's unfinished runs in manifest order; returns a summary for the CLI's JSON line."""
    plan_dir, runs = load_manifest(manifest)
    i, n = parse_shard(shard_spec)
    results = Path(results) if results else plan_dir / "results.jsonl"
    mine = shard(runs, i, n)
    done = {r["name"] for r in read_rows(results) if finished(r)}
    todo = [r for r in mine if r["name"] not in done]
    log(f"{len(mine)} runs in shard {i}/{n}: {len(mine) - len(todo)} already in {results}, {len(todo)} to train")
    total_flops = sum(r["flops_per_token"] * r["D"] for r in todo)
    spent, flops_done, failed, trained, stopped = 0.0, 0.0, [], 0, False
    for k, run in enumerate(todo, 1):
        rate = flops_done / spent if spent else None
        eta = (total_flops - flops_done) / rate if rate else None
        log(
            f"[{k}/{len(todo)}] {run['name']}: N={run['N']:.3g} D={run['D']:.3g} {run['steps']} steps "
            f"(ETA for the rest {_eta(eta)})"
        )
        start = time.perf_counter()
        try:
            summary = trainer(run)
        except Exception as e:  # the trainer itself broke (e.g. could not start): record it, go on
            summary = {"exit_code": -1, "error": f"{type(e).__name__}: {e}"}
        wall = time.perf_counter() - start
        if summary.get("exit_code") == PREEMPTED:
            log(f"[{k}/{len(todo)}] {run['name']}: stopped by SIGTERM after saving; run the same command to resume")
            stopped = True
            break
        row = result_row(run, summary, wall)
        append_row(results, row)
        spent, flops_done = spent + wall, flops_done + run["flops_per_token"] * run["D"]
        if row.get("error"):
            failed.append(run["name"])
            log(f"[{k}/{len(todo)}] {run['name']}: FAILED after {wall:.0f}s: {row['error']}")
        else:
            trained += 1
            log(f"[{k}/{len(todo)}] {run['name']}: loss {row['loss']:.4f} in {wall:.0f}s")
    csv_path = write_csv(results) if results.is_file() else None
    return {
        "results": str(results),
        "csv": str(csv_path) if csv_path else None,
        "shard": f"{i}/{n}",
        "runs": len(mine),
        "skipped": len(mine) - len(todo),
        "trained": trained,
        "failed": failed,
        "stopped": stopped,
        "wall_s": round(spent, 1),
        "convention": SCALING_CONVENTION,
    }
