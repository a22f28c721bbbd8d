"""The step-time model (``moela.planner.steptime``): its collective formulas against routing
simulations, its FLOP accounting against ``moela.model.flops``, and its predictions against
published pod runs (``moela.planner.published``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from moela.configs import load
from moela.model.flops import training_flops_per_token
from moela.model.params import count_params
from moela.planner import published
from moela.planner.chips import CHIPS
from moela.planner.cli import main as planner_main
from moela.planner.search import search
from moela.planner.steptime import (
    REMAT,
    Network,
    Parallelism,
    Workload,
    attention_flops,
    layer_matmuls,
    moela_parallelism,
    resolve_dispatch,
    step_time,
    weight_elements,
)

V5P, H100 = CHIPS["v5p"], CHIPS["h100"]


def torus_all_to_all_load(side: int, dims: int, payload: float) -> float:
    """Bytes on the busiest directed link when every chip of a ``side``^``dims`` torus sends
    payload/n to every chip, routed dimension by dimension along the shorter way round (ties
    split): an independent simulation of what ``Network`` puts in a formula."""
    n = side**dims
    load: dict = {}
    for src, dst in itertools.product(itertools.product(range(side), repeat=dims), repeat=2):
        here = list(src)
        for axis in range(dims):
            forward = (dst[axis] - here[axis]) % side
            ways = [(+1, forward)] if forward < side - forward else [(-1, side - forward)]
            if forward and forward == side - forward:
                ways = [(+1, forward), (-1, forward)]
            for step, hops in ways:
                pos = list(here)
                for _ in range(hops):
                    link = (tuple(pos), axis, step)
                    load[link] = load.get(link, 0.0) + payload / n / len(ways)
                    pos[axis] = (pos[axis] + step) % side
            here[axis] = dst[axis]
    return max(load.values())


@pytest.mark.parametrize(
    "chip,par,side,dims",
    [
        ("v6e", Parallelism(expert=16), 4, 2),
        ("v6e", Parallelism(expert=64), 8, 2),
        ("v5p", Parallelism(expert=64), 4, 3),
        ("v5p", Parallelism(expert=64, tensor=8), 8, 2),  # the expert axis spans 2 of an 8x8x8 slice's dims
    ],
)
def test_torus_all_to_all_matches_a_routing_simulation(chip, par, side, dims):
    chip = CHIPS[chip]
    net = Network(chip, par)
    payload = 1e9
    predicted = net.time("all_to_all", "expert", payload) - chip.latency * dims * (side - 1)
    simulated = torus_all_to_all_load(side, dims, payload) / chip.link_bw
    assert predicted == pytest.approx(simulated, rel=1e-9)


def test_torus_all_gather_is_the_bidirectional_ring_algorithm():
    """An axis of 8 on an 8x8x8 slice is one ring: n - 1 steps, each moving V/(2n) each way."""
    par = Parallelism(fsdp=64, tensor=8)
    net = Network(V5P, par)
    v = 8e9
    ring = (8 - 1) * v / (2 * 8) / V5P.link_bw
    assert net.time("all_gather", "tensor", v) == pytest.approx(ring + V5P.latency * 7)
    # fsdp = 64 spans two dimensions of 8: twice the links, so half the time of one ring of 64.
    two_dims = v * 63 / 64 / (2 * 2 * V5P.link_bw)
    assert net.time("reduce_scatter", "fsdp", v) == pytest.approx(two_dims + V5P.latency * 14)
    assert net.time("all_reduce", "fsdp", v) == pytest.approx(2 * net.time("reduce_scatter", "fsdp", v))


def test_switch_network_inside_and_across_nodes():
    par = Parallelism(data=16, tensor=8)  # tensor fills the NVLink node, data crosses nodes
    net = Network(H100, par)
    v, lat = 1e9, H100.latency
    assert net.time("all_gather", "tensor", v) == pytest.approx(v * 7 / 8 / H100.link_bw + lat * 3)
    assert net.time("all_gather", "data", v) == pytest.approx(v * 15 / 16 / H100.dcn_bw + lat * 4)
    ep = Network(H100, Parallelism(expert=64))  # 8 of the 64 in each node: 7/8 of the payload leaves it
    expect = v * 7 / 64 / H100.link_bw + v * 56 / 64 / H100.dcn_bw + lat * 6
    assert ep.time("all_to_all", "expert", v) == pytest.approx(expect)
    assert net.time("all_gather", "sequence", v) == 0.0  # a size-1 axis moves nothing


MTP = {
    "tiny_mtp": ("tiny", ["model.mtp_depth=2"]),
    "dense_mtp": ("small", ["model.mtp_depth=1", "model.moe.num_experts=0"]),
}


def preset(name: str):
    return load(*MTP.get(name, (name, []))).model


@pytest.mark.parametrize("name", ["bench", "deepseek_v3", "tiny", "tiny_mtp", "dense_mtp"])
@pytest.mark.parametrize("tensor", [1, 2])
def test_model_flops_equal_moela_flops(name, tensor):
    """Summed over a tensor group, the model FLOPs the step-time model attributes to its ops are
    ``model.flops``' training FLOPs (6·N_active + causal attention scores, LM head once per output:
    the model's and each multi-token-prediction depth's, whose blocks count like layers)."""
    model = preset(name)
    seq, tokens = 512, 1000.0
    par = Parallelism(tensor=tensor)
    per_token = 0.0
    mtp_moe = bool(model.num_moe_layers)
    for moe, layers in ((False, model.num_dense_layers), (True, model.num_moe_layers)):
        layers += model.mtp_depth if moe == mtp_moe else 0
        if layers:
            ops = layer_matmuls(model, par, tokens, moe)
            per_token += layers * 3 * sum(op.model_flops for op in ops) * tensor / tokens
            per_token += layers * 3 * attention_flops(model, par, tokens, seq, CHIPS["v5p"])[0] * tensor / tokens
    per_token += (
        6 * model.d_model * model.vocab_size * (1 + model.mtp_depth) + 6 * model.mtp_depth * 2 * model.d_model**2
    )
    assert per_token == pytest.approx(training_flops_per_token(model, seq)["total"], rel=1e-6)


@pytest.mark.parametrize("name", ["bench", "deepseek_v3", "tiny", "small", "tiny_mtp", "dense_mtp"])
def test_weight_elements_equal_the_parameter_count(name):
    model = preset(name)
    counts = count_params(model)
    dense, experts, embed = weight_elements(model)
    assert experts == counts["routed_experts"]
    assert dense + experts + embed == counts["total"] - counts["norms"]


def test_one_chip_has_no_collectives_and_compute_scales_with_the_batch():
    model = load("bench").model
    one = step_time(Workload(model, 8, 256, remat="none"), Parallelism(), V5P)
    assert all(v == 0 for v in one["collectives_s"].values())
    double = step_time(Workload(model, 16, 256, remat="none"), Parallelism(), V5P)
    for term in ("matmuls", "attention", "memory_bound"):
        assert double["terms_s"][term] > 1.6 * one["terms_s"][term]
    full = step_time(Workload(model, 8, 256, remat="full"), Parallelism(), V5P)
    assert (
        one["terms_s"]["matmuls"] < full["terms_s"]["matmuls"] < one["terms_s"]["matmuls"] * 4 / 3
    )  # head not rematted
    assert full["hfu"] > full["mfu"] and set(REMAT) == {"none", "full", "dots", "dots_no_batch"}


def test_a_host_without_overlap_exposes_every_collective():
    """``Chip.overlap=False`` (a CPU host: the same cores copy and compute): each collective is
    charged in full, where a pod chip hides the FSDP and data-parallel traffic behind compute."""
    model = load("bench").model
    work, par = Workload(model, 8, 256, microbatches=2, remat="none"), Parallelism(data=2, fsdp=2, tensor=2)
    hidden = step_time(work, par, V5P)
    host = step_time(work, par, dataclasses.replace(V5P, overlap=False))
    assert hidden["terms_s"]["fsdp"] < hidden["collectives_s"]["fsdp"]
    assert hidden["terms_s"]["data_parallel"] < hidden["collectives_s"]["data_parallel"]
    for term in ("fsdp", "data_parallel"):
        assert host["terms_s"][term] == pytest.approx(host["collectives_s"][term], rel=1e-12)
    assert host["terms_s"]["tensor_parallel"] > hidden["terms_s"]["tensor_parallel"]
    compute = ("matmuls", "attention", "memory_bound", "optimizer")
    assert all(host["terms_s"][k] == pytest.approx(hidden["terms_s"][k]) for k in compute)


def test_strategies_map_onto_parallelism():
    mesh = {"data": 4, "tensor": 2, "sequence": 2}
    assert moela_parallelism("fsdp_tp_sp", mesh) == Parallelism(fsdp=4, tensor=2, sequence=2)
    assert moela_parallelism("dp_tp_sp", mesh) == Parallelism(expert=4, tensor=2, sequence=2)
    assert moela_parallelism("ep_tp", {"data": 8}, has_experts=False) == Parallelism(data=8)


def test_all_to_all_is_the_default_where_it_beats_the_ring():
    """The rule behind ``runtime.expert_dispatch=auto``: on TPU and GPU the exchange moves k·M rows
    where the ring moves n·M, so it is never slower; on a CPU host the ring."""
    model = load("deepseek_v3").model
    for chip, par in ((V5P, Parallelism(expert=64, tensor=8)), (H100, Parallelism(expert=64, tensor=4))):
        assert resolve_dispatch("auto", chip) == "all_to_all"
        times = {
            d: step_time(Workload(model, 1024, 4096, dispatch=d), par, chip)["terms_s"]["expert_dispatch"]
            for d in ("all_to_all", "ring", "gather")
        }
        assert times["all_to_all"] < times["ring"] and times["all_to_all"] < times["gather"]
    assert resolve_dispatch("auto", dataclasses.replace(V5P, network="host")) == "ring"


def test_published_figures_convert_to_their_authors_conventions():
    """The step times derived from published figures reproduce the figures in their authors' own
    FLOP conventions: MaxText DeepSeek-V3 152.4 TFLOP/s/chip (causal attention), Mixtral 52.56% MFU
    (non-causal, before MaxText's July 2025 change)."""
    runs = {r.name: r for r in published.runs()}
    ds = runs["MaxText DeepSeek-V3 671B"]
    per_device = 6 * 8192  # per-device batch 6 at 8192 tokens
    flops = training_flops_per_token(ds.model, ds.seq)["total"] * per_device
    assert flops / ds.published_step_s / 1e12 == pytest.approx(152.415, rel=2e-3)
    mix = runs["MaxText Mixtral-8x7B"]
    noncausal = training_flops_per_token(mix.model, mix.seq, causal_halving=False)["total"] * 36 * 4096
    assert noncausal / mix.published_step_s / V5P.bf16_flops == pytest.approx(0.5256, abs=2e-3)


def test_predictions_within_25_percent_of_published_runs():
    rows = [published.compare(r) for r in published.runs()]
    assert len(rows) >= 12 and {r["chip"] for r in rows} >= {"v4", "v5p", "v6e", "h100"}
    for r in rows:
        assert 0.75 <= r["ratio"] <= 1.25, r
    ratios = np.array([r["ratio"] for r in rows if not r["calibration"]])
    assert math.exp(abs(np.log(ratios).mean())) < 1.15  # no large systematic bias on the checks


@pytest.mark.parametrize(
    "chip,mesh,strategy", [("v5p", "data=64,tensor=8", "fsdp_tp_sp"), ("h100", "data=32,tensor=8", "fsdp_tp_sp")]
)
def test_cli_prints_the_deepseek_v3_step_table(capsys, chip, mesh, strategy):
    argv = ["--config", "deepseek_v3", "--mesh", mesh, "--strategy", strategy, "--batch", "512", "--seq", "4096"]
    assert planner_main([*argv, "--chip", chip, "--set", "train.microbatches=4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])["step_time"]
    chips = 512 if chip == "v5p" else 256
    assert any(line.startswith(f"step time on {chips} x {chip}:") for line in out)
    assert 0.05 < r["mfu"] < 0.8 and r["dominant"] in r["terms_s"] and r["terms_s"]["fsdp"] >= 0
    assert r["tokens_per_s_per_chip"] == pytest.approx(512 * 4096 / r["step_s"] / chips)


def test_search_lists_the_fastest_that_fit(capsys):
    cfg = load("tiny")
    found = search(cfg, V5P, 8, 8, 128, top=3)
    rows = found["results"]
    assert len(rows) == 3 and found["planned_exactly"] >= 3 and found["considered"] > 20
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert all(r["train_bytes"] <= V5P.hbm_bytes for r in rows)
    best = rows[0]  # it is what the model says for that configuration
    par = moela_parallelism(best["strategy"], best["mesh"])
    dispatch = best["dispatch"].split()[0]  # "-" (no expert axis), or e.g. "all_to_all c=2"
    work = Workload(cfg.model, 8, 128, best["microbatches"], best["remat"], "auto" if dispatch == "-" else dispatch, 4)
    assert step_time(work, par, V5P)["step_s"] == pytest.approx(best["step_s"])
    assert planner_main(["--config", "tiny", "--search", "--chip", "v5p"]) == 2
    assert "--search needs --chip and --devices" in capsys.readouterr().err
