"""Grouped expert matmul on this backend: ragged_dot against the blocked loop.

    python bench/moe.py [--tokens 4096] [--config bench] [--repeats 5]

One MoE layer of the config (routing included), forward and forward+backward, jitted;
alternating implementations, median of repeats. A 2048^3 float32 calibration matmul (best of 5) runs
before and after so a noisy host shows in the output. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics

from moela.parallel.host import fast_allocator


import jax
import jax.numpy as jnp
from flax import nnx

from moela.configs import RuntimeConfig, load
from moela.model.moe import MoE
from moela.model.runtime import Runtime
from moela.training.metrics import measure_matmul_flops

from harness import timed


def calibrate() -> float:
    """GFLOP/s of a 2048³ float32 matmul (the same ceiling bench/train.py and the trainer's MFU use)."""
    return measure_matmul_flops(jnp.float32, 2048) / 1e9


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load(args.config).model
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, cfg.d_model), jnp.float32)
    gflops_before = calibrate()
    results = {}
    for rnd in range(2):  # alternate A/B twice
        for impl in ("ragged_dot", "blocked"):
            moe = MoE(cfg.moe, cfg.ctx, rngs=nnx.Rngs(0))
            rt = Runtime(RuntimeConfig(grouped_matmul=impl))
            fwd = nnx.jit(lambda m, v, rt=rt: m(v, rt=rt)[0])
            bwd = nnx.jit(nnx.grad(lambda m, v, rt=rt: jnp.sum(m(v, rt=rt)[0] ** 2)))
            results.setdefault((impl, "forward"), []).append(timed(fwd, moe, x, repeats=args.repeats))
            results.setdefault((impl, "forward_backward"), []).append(timed(bwd, moe, x, repeats=args.repeats))
    gflops_after = calibrate()
    for (impl, kind), samples in results.items():
        print(
            json.dumps(
                {
                    "bench": "moe_grouped_matmul",
                    "config": args.config,
                    "impl": impl,
                    "pass": kind,
                    "tokens": args.tokens,
                    "experts": cfg.moe.num_experts,
                    "top_k": cfg.moe.experts_per_token,
                    "d_model": cfg.d_model,
                    "d_ff": cfg.moe.d_ff,
                    "median_ms": round(1e3 * statistics.median(samples), 2),
                    "calibration_gflops": [round(gflops_before), round(gflops_after)],
                    "backend": jax.default_backend(),
                }
            )
        )


if __name__ == "__main__":
    main()
