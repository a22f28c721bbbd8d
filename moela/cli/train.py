"""Train a moela model: ``python train.py --config <preset or FILE.py> [--set key=value ...]``.

Trains on ``data.dataset`` (by default the embedded local-text corpus, built on first use),
evaluates, checkpoints to ``train.out_dir`` and resumes from there on restart with no flag.
Prints a progress bar, one summary and, as the last line, a JSON object. Exit codes:
0 done, 1 non-finite loss, 2 bad config, data or checkpoints, 143 stopped by SIGTERM after saving.

Several processes (hosts) train one model when the environment says so (see
``parallel.distributed``): e.g. ``MOELA_COORDINATOR=host0:1234 MOELA_NUM_PROCESSES=2
MOELA_PROCESS_ID=<0|1> python train.py ...`` on each host, or nothing at all on a Cloud TPU
slice, SLURM or Open MPI.
"""

from __future__ import annotations

import argparse
import json
import sys

# Nothing here imports JAX at module level: ``entry`` must set the allocator up first.
from moela.configs import ConfigError
from moela.configs.loader import cap_steps, config_from_cli
from moela.parallel.host import active_allocator, fast_allocator


def sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    marks = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    picked = values[::step]
    lo, hi = min(picked), max(picked)
    return "".join(marks[int((v - lo) / (hi - lo + 1e-12) * (len(marks) - 1))] for v in picked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python train.py", description=__doc__.split("\n\n")[0])
    _, cfg = config_from_cli(parser, argv)
    try:
        cfg, capped = cap_steps(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if capped:
        print(capped)
    from moela.parallel.distributed import DistributedConfigError, initialize

    try:
        initialize()  # before any other JAX call; a no-op for a single process
    except DistributedConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # after the config is known good: jax start-up is slow
    from moela.data.text_builder import DataError
    from moela.model.checkpoint import CheckpointError
    from moela.model.params import count_params, human
    from moela.training.loop import NonFiniteLoss, run

    counts = count_params(cfg.model)
    print(
        f"config {cfg.name}: {human(counts['total'])} parameters, {human(counts['active'])} active per token; "
        f"host allocator: {active_allocator()}"
    )
    try:
        summary = run(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax

    if jax.process_index() != 0:  # with several processes, process 0 reports
        return summary["exit_code"]
    losses = [loss for _, loss in summary["history"]]
    if losses:
        tail = losses[-max(1, len(losses) // 10) :]
        print(
            f"train loss {losses[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} logged)  "
            f"{sparkline(losses)}"
        )
    if "eval_loss" in summary:
        print(
            f"validation loss {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f}); "
            f"unigram entropy of the validation tokens {summary['unigram_entropy']:.4f}"
        )
    print(f"run directory: {summary['run_dir']} (metrics.jsonl, loss.png, tensorboard/, checkpoints/)")
    summary.pop("history")
    print(json.dumps(summary))
    return summary["exit_code"]


def entry() -> None:
    """The console script: a page-keeping allocator first (malloc settings are read at process
    start, so this re-executes once, before JAX is imported), then ``main``."""
    fast_allocator()
    sys.exit(main())


if __name__ == "__main__":
    entry()
