"""Training-step time of the ``bench`` preset under each sharding strategy on 8 fake CPU devices,
and the parameter bytes each strategy leaves on one device.

    python bench/parallel.py [--batch 8] [--seq 256] [--steps 3] [--rounds 2]

Every strategy runs the same full step (forward, backward, AdamW) on the same synthetic
batch, alternating rounds (each round rebuilds one strategy's state at a time, so only one
is in memory), on a mesh that uses the axes the strategy names (sizes below).
The 8 "devices" are threads of one 2-core host sharing its memory: collectives are memory
copies and every device competes for the same two cores, so the times show the overhead
of each strategy's collectives and partitioned programs, not what it buys on real chips.
The parameter bytes per device are exact and hold on any hardware with that mesh.
Prints one JSON line per strategy (median step time, ratio to ``dp``, MiB per device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
from moela.parallel.host import active_allocator, fast_allocator


import jax

from harness import synthetic_batch
from moela.configs import load
from moela.configs.schema import MeshConfig
from moela.parallel import sharded
from moela.parallel.layout import Layout, state_bytes
from moela.parallel.mesh import build_mesh
from moela.training.optim import optimizer
from moela.training.step import make_train_step

MESHES = {  # strategy -> (data, tensor, sequence)
    "dp": (8, 1, 1),
    "fsdp": (8, 1, 1),
    "tp": (4, 2, 1),
    "ep_tp": (4, 2, 1),
    "dp_tp_sp": (2, 2, 2),
    "fsdp_tp_sp": (2, 2, 2),
}


def stepper(cfg, strategy: str, batch_np):
    """(run one step, first-step seconds, parameter MiB per device, optimizer MiB per device)."""
    layout = Layout.of(build_mesh(MeshConfig(*MESHES[strategy])), strategy)
    tx = optimizer(cfg.train)
    graphdef, params, rest, opt, state_shardings = sharded.init_train_state(cfg.model, tx, layout)
    step = make_train_step(graphdef, cfg, tx, layout, state_shardings)
    batch = jax.device_put(batch_np, sharded.batch_sharding(layout))
    state = {"params": params, "rest": rest, "opt": opt}
    param_mib = state_bytes(params, layout) / 2**20
    opt_mib = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(opt)) / 2**20

    def run():
        state["params"], state["rest"], state["opt"], m = step(state["params"], state["rest"], state["opt"], batch)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0, param_mib, opt_mib


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--strategies", default=",".join(MESHES))
    args = parser.parse_args()
    cfg = load(args.config, [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}"])
    batch = synthetic_batch(cfg.model.vocab_size, args.batch, args.seq)
    names = args.strategies.split(",")
    samples: dict[str, list[float]] = {name: [] for name in names}
    info = {}
    for _ in range(args.rounds):  # one strategy's state at a time: eight replicas of dp's do not fit twice
        for name in names:
            run, first, param_mib, opt_mib = stepper(cfg, name, batch)
            info.setdefault(name, (first, param_mib, opt_mib))
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
            del run
    medians = {name: statistics.median(v) for name, v in samples.items()}
    for name in names:
        first, param_mib, opt_mib = info[name]
        record = {
            "bench": "parallel_step",
            "config": args.config,
            "strategy": name,
            "mesh": dict(zip(("data", "tensor", "sequence"), MESHES[name])),
            "batch": args.batch,
            "seq": args.seq,
            "step_s_median": round(medians[name], 4),
            "tokens_per_s": round(args.batch * args.seq / medians[name], 1),
            "param_mib_per_device": round(param_mib, 2),
            "opt_state_mib_per_device": round(opt_mib, 2),
            "first_step_s (compile)": round(first, 2),
            "samples": len(samples[name]),
            "devices": "8 fake CPU devices on one host: times show overheads only",
            "allocator": active_allocator(),
        }
        if "dp" in medians:
            record["step_time_vs_dp"] = round(medians[name] / medians["dp"], 3)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
