"""Training-step time of the ``bench`` preset under each sharding strategy on 8 fake CPU devices,
and the parameter bytes each strategy leaves on one device; with ``--dispatch``, the step time of
each expert dispatch (``runtime.expert_dispatch``) under one expert-parallel strategy instead.

    python bench/parallel.py [--batch 8] [--seq 256] [--steps 3] [--rounds 2]
    python bench/parallel.py --dispatch [--dispatch-mesh 8x1x1] [--dispatches ring,gather,all_to_all,all_to_all:1.25]

Every strategy runs the same full step (forward, backward, AdamW) on the same synthetic
batch, alternating rounds (each round rebuilds one strategy's state at a time, so only one
is in memory), on a mesh that uses the axes the strategy names (sizes below).
The 8 "devices" are threads of one 2-core host sharing its memory: collectives are memory
copies and every device competes for the same two cores, so the times show the overhead
of each strategy's collectives and partitioned programs, not what it buys on real chips.
The parameter bytes per device are exact and hold on any hardware with that mesh.
Prints one JSON line per strategy (median step time, ratio to ``dp``, MiB per device).

``--dispatch``: ``ep_tp`` on the ``--dispatch-mesh`` (experts split over ``data``), every dispatch
(``all_to_all:C`` sets ``runtime.expert_capacity`` = C) timed in alternating rounds the same way;
one JSON line each with the median step time, its ratio to ``ring``, the pairs the last step
dropped, and the bytes a device sends per MoE layer forward (``parallel.experts.dispatch_bytes``:
as run here, where ``all_to_all`` is padded, and, for ``all_to_all``, ragged as on TPU/GPU).
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
from moela.parallel.experts import dispatch_bytes
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


def stepper(cfg, strategy: str, batch_np, shape=None):
    """(run one step -> its metrics, first-step seconds, parameter MiB per device, optimizer MiB
    per device), on mesh ``shape`` (data, tensor, sequence; default ``MESHES[strategy]``)."""
    layout = Layout.of(build_mesh(MeshConfig(*(shape or MESHES[strategy]))), strategy)
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
        return m

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0, param_mib, opt_mib


def timed(runs: dict, batch, args):
    """Per name of ``runs`` (name -> (config, strategy, mesh shape or None)): its median step seconds,
    (first-step seconds, param MiB, opt MiB), last metrics and samples, timed in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    info, last = {}, {}
    for _ in range(args.rounds):  # one state at a time: eight replicas of dp's do not fit twice
        for name, (cfg, strategy, shape) in runs.items():
            run, first, param_mib, opt_mib = stepper(cfg, strategy, batch, shape)
            info.setdefault(name, (first, param_mib, opt_mib))
            for _ in range(args.steps):
                t0 = time.perf_counter()
                last[name] = run()
                samples[name].append(time.perf_counter() - t0)
            del run
    return {name: statistics.median(v) for name, v in samples.items()}, info, last, samples


def compare_dispatches(args, batch) -> None:
    """The ``--dispatch`` section: every expert dispatch under ``ep_tp`` on ``--dispatch-mesh``."""
    shape = tuple(int(v) for v in args.dispatch_mesh.split("x"))
    cfgs = {}
    for name in args.dispatches.split(","):
        dispatch, _, capacity = name.partition(":")
        overrides = [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}"]
        overrides += [f"runtime.expert_dispatch={dispatch}", f"runtime.expert_capacity={capacity or 0}"]
        cfgs[name] = load(args.config, overrides)
    medians, info, last, samples = timed({name: (c, "ep_tp", shape) for name, c in cfgs.items()}, batch, args)
    layout = Layout.of(build_mesh(MeshConfig(*shape)), "ep_tp")
    for name, cfg in cfgs.items():
        model, runtime = cfg.model, cfg.runtime
        size = dict(
            rows=args.batch * args.seq // (layout.size("batch") * layout.size("length")),
            k=model.moe.experts_per_token,
            n=layout.size("expert"),
            d_model=model.d_model,
            itemsize=jax.numpy.dtype(model.compute_dtype).itemsize,
            capacity=runtime.expert_capacity,
        )
        record = {
            "bench": "parallel_dispatch",
            "config": args.config,
            "strategy": "ep_tp",
            "mesh": dict(zip(("data", "tensor", "sequence"), shape)),
            "dispatch": runtime.expert_dispatch,
            "expert_capacity": runtime.expert_capacity,
            "batch": args.batch,
            "seq": args.seq,
            "local_rows": size["rows"],
            "step_s_median": round(medians[name], 4),
            "moe_dropped_pairs_last_step": int(last[name]["moe_dropped_pairs"]),
            "fwd_bytes_per_moe_layer_per_device": dispatch_bytes(runtime.expert_dispatch, **size, ragged=False),
            "first_step_s (compile)": round(info[name][0], 2),
            "samples": len(samples[name]),
            "devices": "8 fake CPU devices on one host: times show overheads only",
        }
        if runtime.expert_dispatch == "all_to_all":
            record["fwd_bytes_per_moe_layer_per_device_ragged"] = dispatch_bytes("all_to_all", **size, ragged=True)
        if "ring" in medians:
            record["step_time_vs_ring"] = round(medians[name] / medians["ring"], 3)
        print(json.dumps(record), flush=True)


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--strategies", default=",".join(MESHES))
    parser.add_argument("--dispatch", action="store_true", help="compare expert dispatches instead")
    parser.add_argument("--dispatch-mesh", default="8x1x1", help="data x tensor x sequence for --dispatch")
    parser.add_argument("--dispatches", default="ring,gather,all_to_all,all_to_all:1.25")
    args = parser.parse_args()
    cfg = load(args.config, [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}"])
    batch = synthetic_batch(cfg.model.vocab_size, args.batch, args.seq)
    if args.dispatch:
        compare_dispatches(args, batch)
        return
    names = args.strategies.split(",")
    medians, info, _, samples = timed({name: (cfg, name, None) for name in names}, batch, args)
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
