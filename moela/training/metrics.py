"""Throughput, MFU and the metrics log.

MFU = (training FLOPs per token, ``scaling.flops``) × tokens/s ÷ (peak FLOP/s × devices).
The peak comes from ``train.peak_flops`` if set, else a per-device table (dense bf16), else,
on CPU, a matmul measured once at start-up in the compute dtype.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

PEAK_FLOPS = {  # dense bfloat16 FLOP/s per device (chip)
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def measure_matmul_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(configured: float, compute_dtype) -> tuple[float, str]:
    """(per-device peak FLOP/s, where it came from)."""
    if configured > 0:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"table:{name}"
    return measure_matmul_flops(compute_dtype), f"measured:{kind}"


class MetricsLog:
    """``RUN/metrics.jsonl`` (one JSON object per line) and TensorBoard scalars in
    ``RUN/tensorboard``, written by process 0 only.

    On resume, lines and events of steps after the restored checkpoint are dropped: those
    steps are recomputed, bit-identically, and logged again.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if resume_step is not None and record.get("step", -1) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(
            str(self.run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            plot_losses(self.path, self.run_dir / "loss.png")


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
