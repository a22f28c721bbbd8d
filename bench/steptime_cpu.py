"""The step-time model where it can be checked: predicted vs measured training steps on this CPU.

    python bench/steptime_cpu.py [--batch 8] [--seq 256] [--steps 3] [--rounds 2]

First it measures the host as a "chip" (``planner.chips.Chip``, network ``host``) under the same
load the step runs with: n fake devices computing at once share the cores, so the per-device
matmul FLOP/s, streaming bandwidth (an elementwise add) and copy rate between devices (a
``ppermute``) are measured with all n busy. Then it predicts the ``bench`` preset's training step
(``planner.steptime.step_time``) on 1 device (``dp``) and on 8 fake devices (``dp`` 8x1x1 and
``ep_tp`` 4x2x1, experts split over data with the ring dispatch) and measures the same steps
(median of ``--steps`` x ``--rounds``, alternating). Prints one JSON line per chip measurement and
per configuration (predicted, measured, ratio and the predicted terms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
from moela.parallel.host import fast_allocator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from harness import synthetic_batch, timed
from moela.configs import load
from moela.configs.schema import MeshConfig
from moela.parallel import sharded
from moela.parallel.layout import Layout
from moela.parallel.mesh import build_mesh
from moela.planner.chips import Chip
from moela.planner.steptime import Workload, moela_parallelism, step_time
from moela.training.optim import optimizer
from moela.training.step import make_train_step

CONFIGS = {"1 device dp": ((1, 1, 1), "dp"), "8 devices dp": ((8, 1, 1), "dp"), "8 devices ep_tp": ((4, 2, 1), "ep_tp")}


def measure_chip(n: int) -> Chip:
    """The host seen by each of n devices computing at once (float32, as the bench preset)."""
    mesh = jax.make_mesh((n,), ("d",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Explicit,))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))  # noqa: E731
    rows, k, f = 2048, 512, 1536  # the bench preset's MLP matmul: batch 8 x seq 256 rows, d_model 512, d_ff 1536
    rng = np.random.default_rng(0)
    x = put(rng.normal(size=(n * rows, k)).astype(np.float32))
    w = jax.device_put(rng.normal(size=(k, f)).astype(np.float32), NamedSharding(mesh, P()))
    matmul = jax.jit(jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d")))
    flops = 2 * rows * k * f / timed(matmul, x, w)
    big, other = (put(np.ones((n * 8 * 2**20,), np.float32)) for _ in range(2))  # 32 MiB a device each
    add = jax.jit(jax.shard_map(lambda x, y: 0.9 * x + y, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
    # An elementwise op writes a fresh buffer, as XLA's fusions in a training step do: the rate
    # includes what the allocator costs, which an in-place (donated) update does not pay.
    stream = 3 * 32 * 2**20 / timed(add, big, other)
    in_place = jax.jit(add, donate_argnums=0)
    state = {"x": big}

    def stream_step():
        state["x"] = in_place(state["x"], other)
        return state["x"]

    print(
        json.dumps(
            {
                "bench": "steptime_cpu_stream_in_place",
                "devices": n,
                "GB_s": round(3 * 32 * 2**20 / timed(stream_step) / 1e9, 2),
            }
        )
    )
    if n > 1:
        perm = [(i, (i + 1) % n) for i in range(n)]
        shift = jax.jit(
            jax.shard_map(lambda x: jax.lax.ppermute(x, "d", perm), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
        )
        link = 32 * 2**20 / timed(shift, other)
    else:
        link = stream
    # The efficiencies are folded into the measured rates: each is what a well-shaped op reaches.
    return Chip(
        f"cpu/{n}", flops, None, 24e9 / n, stream, "host", link, link, mxu=1, group_rows=128,
        matmul_eff=1.0, grouped_eff=1.0, attention_eff=1.0, hbm_eff=1.0, attention_bwd=2.0, latency=50e-6,
        overlap=False,
    )  # fmt: skip


def stepper(cfg, shape, strategy, batch_np):
    layout = Layout.of(build_mesh(MeshConfig(*shape), jax.devices()[: int(np.prod(shape))]), strategy)
    tx = optimizer(cfg.train)
    graphdef, params, rest, opt, shardings = sharded.init_train_state(cfg.model, tx, layout)
    step = make_train_step(graphdef, cfg, tx, layout, shardings)
    batch = jax.device_put(batch_np, sharded.batch_sharding(layout))
    state = {"params": params, "rest": rest, "opt": opt}

    def run():
        state["params"], state["rest"], state["opt"], m = step(state["params"], state["rest"], state["opt"], batch)
        jax.block_until_ready(m["loss"])

    run()
    return run


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cfg = load(
        "bench", [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}", "runtime.expert_dispatch=ring"]
    )
    chips = {n: measure_chip(n) for n in (1, 8)}
    for n, c in chips.items():
        record = {"matmul_flops": c.bf16_flops, "stream_bytes_s": c.hbm_bw, "copy_bytes_s": c.link_bw}
        print(
            json.dumps(
                {
                    "bench": "steptime_cpu_chip",
                    "devices": n,
                    **{k: round(v / 1e9, 2) for k, v in record.items()},
                    "unit": "G/s",
                }
            )
        )
    batch = synthetic_batch(cfg.model.vocab_size, args.batch, args.seq)
    work = Workload(cfg.model, args.batch, args.seq, 1, cfg.runtime.remat, "ring", 4)
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (shape, strategy) in CONFIGS.items():
            run = stepper(cfg, shape, strategy, batch)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
            del run
    for name, (shape, strategy) in CONFIGS.items():
        n = int(np.prod(shape))
        mesh = dict(zip(("data", "tensor", "sequence"), shape))
        r = step_time(work, moela_parallelism(strategy, mesh), chips[n])
        measured = statistics.median(samples[name])
        print(
            json.dumps(
                {
                    "bench": "steptime_cpu",
                    "config": name,
                    "strategy": strategy,
                    "mesh": mesh,
                    "batch": args.batch,
                    "seq": args.seq,
                    "predicted_s": round(r["step_s"], 4),
                    "measured_s": round(measured, 4),
                    "predicted_over_measured": round(r["step_s"] / measured, 3),
                    "samples": len(samples[name]),
                    "terms_s": {k: round(v, 4) for k, v in r["terms_s"].items() if v},
                }  # fmt: skip
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
