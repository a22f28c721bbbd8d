"""``--search``: the fastest ways to train a config on N chips that fit in memory.

Candidates: every moela strategy (``parallel.rules``), every mesh (data, tensor, sequence) of N
chips the config divides (tensor divides the heads, d_ff, expert d_ff and vocab; sequence
divides the length in 2·n zig-zag chunks; data divides the rows and, for expert parallelism, the
experts), every remat policy, microbatch counts that keep whole rows, and for expert-parallel
strategies every expert dispatch. Each gets a predicted step time (``steptime.step_time``,
milliseconds of arithmetic) and a quick memory estimate (``quick_memory_bytes``); the fastest
that the estimate lets through are then planned exactly (``memory.plan``: a traced jaxpr, a few
seconds each), fastest first, until ``top`` fit the chip's HBM or the time budget is spent.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from moela.configs.schema import Config
from moela.parallel.rules import STRATEGIES, ShardingRuleError
from moela.planner.memory import PlanError, plan
from moela.planner.chips import Chip
from moela.planner.steptime import BF16, REMAT, Workload, moela_parallelism, step_time, weight_elements

EXPERT_STRATEGIES = ("ep_tp", "dp_tp_sp")
# (dispatch, runtime.expert_capacity): the dropless exchanges, and all_to_all with buffers of twice
# the average (its dropless receive buffer is n·M·min(k, E/n) rows; at c = 2, 2·M·k: pairs beyond
# it are dropped and counted in moe_dropped_pairs).
DISPATCHES = (("all_to_all", 0.0), ("all_to_all", 2.0), ("ring", 0.0), ("gather", 0.0))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(cfg: Config, chips: int, strategy: str, batch: int, seq: int):
    """(data, tensor, sequence) sizes of ``chips`` devices that the strategy uses and the config divides."""
    model = cfg.model
    rules = dict(STRATEGIES[strategy])
    uses = {axis for axis in rules.values() if axis}
    dims = [model.attention.num_heads, model.d_ff, model.vocab_size]
    if model.attention.kind == "gqa":
        dims.append(model.attention.num_kv_heads)
    if model.moe.num_experts:
        dims.append(model.moe.d_ff)
    for tensor in divisors(chips) if "tensor" in uses else [1]:
        if any(x % tensor for x in dims):
            continue
        for sequence in divisors(chips // tensor) if "sequence" in uses else [1]:
            data = chips // (tensor * sequence)
            if seq % (2 * sequence) and sequence > 1 or batch % data:
                continue
            if data > 1 and "data" not in uses:
                continue
            if rules.get("expert") == "data" and model.moe.num_experts and model.moe.num_experts % data:
                continue
            yield {"data": data, "tensor": tensor, "sequence": sequence}


def quick_memory_bytes(
    cfg: Config, strategy: str, mesh: dict[str, int], remat: str, micro: int, batch: int, seq: int
) -> float:
    """Per-device bytes, roughly: weights, gradients (and an accumulator), float32 AdamW moments,
    and activations saved for the backward (one D-row per token and layer under full remat, the
    layer's matmul outputs otherwise) plus one layer's working set. Only a filter: survivors are
    planned exactly."""
    model, s = cfg.model, BF16 if model_is_bf16(cfg) else 4
    par = moela_parallelism(strategy, mesh, bool(model.moe.num_experts))
    dense, experts, embed = weight_elements(model)
    shard_dense = par.tensor * par.fsdp
    params = (dense + embed) / shard_dense + experts / (shard_dense * par.expert)
    pb = 2 if model.param_dtype == "bfloat16" else 4
    states = params * (pb * (3 if micro > 1 else 2) + 8)
    tokens = batch * seq / (micro * par.row_split * par.sequence)
    d, t = model.d_model, par.tensor
    a = model.attention
    per_token_layer = {
        "full": d,
        "dots": 4 * d
        + a.num_heads / t * (a.qk_head_dim + 2 * a.out_head_dim)
        + 3 * max(model.d_ff, model.moe.d_ff * model.moe.experts_per_token) / t,
    }
    saved = per_token_layer["full"] if remat == "full" else per_token_layer["dots"] * (2 if remat == "none" else 1)
    working = 4 * per_token_layer["dots"] + 4 * model.vocab_size / t / 8  # one layer + a loss chunk
    return states + tokens * s * (saved * model.num_layers + working)


def model_is_bf16(cfg: Config) -> bool:
    return cfg.model.compute_dtype == "bfloat16"


def candidates(cfg: Config, chips: int, batch: int, seq: int):
    moe = bool(cfg.model.moe.num_experts)
    for strategy in STRATEGIES:
        for mesh in meshes(cfg, chips, strategy, batch, seq):
            rows = batch // mesh["data"]
            dispatches = DISPATCHES if moe and strategy in EXPERT_STRATEGIES and mesh["data"] > 1 else ((None, 0.0),)
            for remat, micro, dispatch in itertools.product(REMAT, divisors(rows), dispatches):
                if micro > 64:
                    continue
                yield strategy, mesh, remat, micro, dispatch


def search(cfg: Config, chip: Chip, chips: int, batch: int, seq: int, top: int = 5, budget_s: float = 45.0) -> dict:
    """The fastest configurations that fit (exactly planned), fastest first, with how many were
    predicted and planned. Candidates that are the same run under two strategy names (``fsdp`` and
    ``fsdp_tp_sp`` on a data-only mesh) are predicted once. The quick memory estimate is corrected
    as exact plans come in: per remat policy, by the largest exact/quick ratio seen so far; a
    candidate whose corrected estimate exceeds the chip's HBM by more than 10% is not planned."""
    start = time.perf_counter()
    pb = 2 if cfg.model.param_dtype == "bfloat16" else 4
    scored, seen = [], set()
    for strategy, mesh, remat, micro, dispatch in candidates(cfg, chips, batch, seq):
        par = moela_parallelism(strategy, mesh, bool(cfg.model.moe.num_experts))
        if (par, remat, micro, dispatch) in seen:
            continue
        seen.add((par, remat, micro, dispatch))
        r = step_time(Workload(cfg.model, batch, seq, micro, remat, dispatch[0] or "auto", pb), par, chip)
        scored.append((r["step_s"], strategy, mesh, remat, micro, dispatch, r))
    scored.sort(key=lambda x: x[0])
    results, planned, correction = [], 0, {}
    for step, strategy, mesh, remat, micro, dispatch, r in scored:
        if len(results) >= top or time.perf_counter() - start > budget_s:
            break
        quick = quick_memory_bytes(cfg, strategy, mesh, remat, micro, batch, seq)
        if remat in correction and quick * correction[remat] > 1.1 * chip.hbm_bytes:
            continue
        runtime = cfg.runtime
        if dispatch[0]:
            runtime = dataclasses.replace(runtime, expert_dispatch=dispatch[0], expert_capacity=dispatch[1])
        c = dataclasses.replace(
            cfg,
            runtime=dataclasses.replace(runtime, remat=remat),
            train=dataclasses.replace(cfg.train, microbatches=micro),
        )
        try:
            total = plan(c, mesh, strategy, batch, seq)["bytes"]["train_total"]
        except (PlanError, ShardingRuleError):
            continue
        planned += 1
        correction[remat] = max(correction.get(remat, 0.0), total / quick)
        if total <= chip.hbm_bytes:
            name = "-" if not dispatch[0] else dispatch[0] + (f" c={dispatch[1]:g}" if dispatch[1] else "")
            row = {"strategy": strategy, "mesh": mesh, "remat": remat, "microbatches": micro, "dispatch": name}
            row.update(step_s=step, mfu=r["mfu"], tokens_per_s_per_chip=r["tokens_per_s_per_chip"])
            results.append({**row, "dominant": r["dominant"], "train_bytes": total})
    return {
        "results": results,
        "considered": len(scored),
        "planned_exactly": planned,
        "seconds": time.perf_counter() - start,
    }
