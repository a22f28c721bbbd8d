"""``python -m moela.planner``: the per-device memory plan, the predicted step time on a chip, and
``--search`` for the fastest configuration that fits.

    python -m moela.planner --config deepseek_v3 --mesh data=64,tensor=8 --strategy ep_tp \\
        --batch 8192 --seq 4096 --chip v5p            # memory plan + step-time table
    python -m moela.planner --config deepseek_v3 --chip h100 --devices 256 --batch 4096 --seq 4096 --search

Without ``--chip`` the memory plan lists every chip it fits; with one it adds the step-time table
(``steptime``). The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from moela.configs.loader import config_from_cli
from moela.parallel.rules import ShardingRuleError
from moela.planner.chips import CHIPS
from moela.planner.memory import PlanError, fits, format_plan, parse_mesh, plan, resolve_mesh
from moela.planner.search import search
from moela.planner.steptime import Workload, format_steptime, moela_parallelism, step_time


def _workload(cfg, batch, seq) -> Workload:
    pb = 2 if cfg.model.param_dtype == "bfloat16" else 4
    dispatch = cfg.runtime.expert_dispatch
    return Workload(cfg.model, batch, seq, cfg.train.microbatches, cfg.runtime.remat, dispatch, pb)


def format_search(found: dict, chip: str, chips: int) -> str:
    lines = [
        f"fastest that fit on {chips} x {chip} ({found['considered']} configurations predicted, "
        f"{found['planned_exactly']} planned exactly, {found['seconds']:.1f} s):",
        f"  {'strategy':<11}{'mesh (d,t,s)':<15}{'remat':<14}{'micro':>5}  {'dispatch':<16}{'step':>9}{'MFU':>7}"
        f"{'tok/s/chip':>12}{'memory':>11}  dominant",
    ]
    for r in found["results"]:
        mesh = ",".join(str(r["mesh"][a]) for a in ("data", "tensor", "sequence"))
        lines.append(
            f"  {r['strategy']:<11}{mesh:<15}{r['remat']:<14}"
            f"{r['microbatches']:>5}  {r['dispatch']:<16}{r['step_s']:>8.2f}s{r['mfu']:>7.1%}"
            f"{r['tokens_per_s_per_chip']:>12.0f}{r['train_bytes'] / 2**30:>7.1f} GiB  {r['dominant']}"
        )
    if not found["results"]:
        lines.append("  none fits (a larger chip count, a smaller batch, or microbatches)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.planner", description="memory plan and step time")
    parser.add_argument("--mesh", help="AXIS=SIZE,... over data, tensor, sequence (default: the config's mesh)")
    parser.add_argument("--devices", type=int, help="device count, to resolve a -1 mesh size (and for --search)")
    parser.add_argument("--strategy", help="sharding strategy (default: the config's mesh.strategy)")
    parser.add_argument("--batch", type=int, help="global batch (default: train.global_batch_size)")
    parser.add_argument("--seq", type=int, help="sequence length (default: train.seq_len)")
    parser.add_argument("--chip", help=f"predict the step time on this chip: {', '.join(CHIPS)}")
    parser.add_argument("--serve-batch", type=int, help="serving rows (default: serve.max_batch)")
    parser.add_argument("--serve-len", type=int, help="serving tokens per row (default: --seq)")
    parser.add_argument(
        "--search", action="store_true", help="list the fastest configurations that fit (needs --chip, --devices)"
    )
    parser.add_argument("--top", type=int, default=5, help="how many --search lists (default 5)")
    args, cfg = config_from_cli(parser, argv)
    batch, seq = args.batch or cfg.train.global_batch_size, args.seq or cfg.train.seq_len
    try:
        if args.chip is not None and args.chip not in CHIPS:
            raise PlanError(f"unknown chip {args.chip!r}; valid: {', '.join(CHIPS)}")
        if args.search:
            if args.chip is None or not args.devices:
                raise PlanError("--search needs --chip and --devices (the chip and how many)")
            found = search(cfg, CHIPS[args.chip], args.devices, batch, seq, top=args.top)
            print(format_search(found, args.chip, args.devices))
            print(json.dumps({"config": cfg.name, "chip": args.chip, "devices": args.devices, **found}))
            return 0
        m = cfg.mesh
        sizes = parse_mesh(args.mesh) if args.mesh else {"data": m.data, "tensor": m.tensor, "sequence": m.sequence}
        sizes = resolve_mesh(sizes, args.devices)
        strategy = args.strategy or m.strategy
        result = plan(cfg, sizes, strategy, batch, seq, args.serve_batch, args.serve_len)
    except (PlanError, ShardingRuleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = fits(result, {args.chip: CHIPS[args.chip]} if args.chip else CHIPS)
    print(format_plan(result, table))
    out = {**result, "chips": table}
    if args.chip:
        par = moela_parallelism(strategy, sizes, bool(cfg.model.moe.num_experts))
        timed = step_time(_workload(cfg, batch, seq), par, CHIPS[args.chip])
        print(format_steptime(timed, args.chip, math.prod(sizes.values())))
        out["step_time"] = timed
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
