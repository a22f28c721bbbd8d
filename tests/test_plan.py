"""The memory planner (``parallel.plan``): its activation estimate against what XLA allocates,
parameter bytes per strategy against an independent count, its errors, and the CLI on the full
DeepSeek-V3 config on a 2048-device abstract mesh."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moela.configs import load
from moela.model.params import count_params
from moela.model.runtime import Runtime
from moela.model.transformer import abstract_model
from moela.planner import memory as planner
from moela.planner.cli import main as planner_main
from moela.training.step import training_objective

ONE_DEVICE = {"data": 1, "tensor": 1, "sequence": 1}
# Two scanned layers of each kind: XLA inlines a one-trip scan and then schedules that layer's
# work side by side with the next scan's, which no memory-aware schedule would do.
LAYERS = ["model.num_layers=4", "model.first_k_dense=2"]
GQA = ["model.attention.kind=gqa", "model.attention.num_kv_heads=2"]


def xla_temp_bytes(cfg, batch: int, seq: int) -> int:
    """``temp_size_in_bytes`` of ``jax.grad`` of the training objective, compiled for one CPU device.

    XLA's buffer assignment puts every value of the compiled program that is neither an argument
    (parameters, router biases, the batch) nor an output (the gradients) into one preallocated
    temp buffer, packing values whose live ranges do not overlap into the same bytes. Its size is
    thus the peak of the intermediates: the residuals the forward scans keep for the backward, the
    working set of a layer's backward (recomputed forward included under remat) and of the chunked
    output-layer loss, plus any packing slack. That is what the planner's ``activations`` estimates,
    which also leaves out inputs and gradients, so the two are comparable. Lowering takes
    ShapeDtypeStructs: nothing is allocated."""
    graphdef, params, rest = nnx.split(abstract_model(cfg.model), nnx.Param, ...)
    t = cfg.train

    def loss(p, r, b):
        obj, _, _, aux = training_objective(
            graphdef, p, r, b, z_coef=t.z_loss, chunk_tokens=t.loss_chunk_tokens, rt=Runtime(cfg.runtime)
        )
        return obj / b["loss_mask"].size + aux["aux_loss"]

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    b = {
        "inputs": tokens,
        "targets": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32),
    }
    return jax.jit(jax.grad(loss)).lower(params, rest, b).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "overrides, batch, seq",
    [
        (LAYERS, 8, 128),  # MLA + MoE, no remat: the stacked residuals dominate
        (LAYERS + ["runtime.remat=full"], 8, 128),  # only the carries kept; the recomputing backward dominates
        (LAYERS + GQA + ["runtime.remat=dots"], 8, 128),  # GQA, matmul outputs kept
    ],
    ids=["mla-none", "mla-full", "gqa-dots"],
)
def test_activation_estimate_matches_xla(overrides, batch, seq):
    cfg = load("tiny", overrides)
    result = planner.plan(cfg, ONE_DEVICE, "dp", batch, seq, accelerator=False)  # the CPU program
    estimate, temp = result["bytes"]["activations"], xla_temp_bytes(cfg, batch, seq)
    print(
        f"{'/'.join(overrides[2:]) or 'base'}: plan {estimate / 2**20:.2f} MiB, XLA temp {temp / 2**20:.2f} MiB, "
        f"ratio {estimate / temp:.3f}"
    )
    assert 0.75 <= estimate / temp <= 1.25, (estimate, temp)
    saved = result["bytes"]["activations_saved"]
    assert 0 < saved <= estimate
    if cfg.runtime.remat == "full":  # only each layer's input x [B, T, D] is kept (and the MoE stats)
        carry = batch * seq * cfg.model.d_model * 4
        assert carry <= result["saved_per_layer"]["dense"] <= result["saved_per_layer"]["moe"] < 1.01 * carry


# The same rules written out by hand: the logical names each strategy splits, and over which axis.
SPLITS = {
    "dp": {},
    "fsdp": {"embed": "data"},
    "tp": {n: "tensor" for n in ("heads", "kv_heads", "mlp", "vocab")},
    "ep_tp": {"expert": "data", **{n: "tensor" for n in ("heads", "kv_heads", "mlp", "vocab")}},
    "dp_tp_sp": {"expert": "data", **{n: "tensor" for n in ("heads", "kv_heads", "mlp", "vocab")}},
    "fsdp_tp_sp": {"embed": "data", **{n: "tensor" for n in ("heads", "kv_heads", "mlp", "vocab")}},
}
MESHES = {
    "dp": {"data": 8, "tensor": 1, "sequence": 1},
    "fsdp": {"data": 8, "tensor": 1, "sequence": 1},
    "tp": {"data": 2, "tensor": 4, "sequence": 1},
    "ep_tp": {"data": 2, "tensor": 4, "sequence": 1},
    "dp_tp_sp": {"data": 2, "tensor": 2, "sequence": 2},
    "fsdp_tp_sp": {"data": 2, "tensor": 2, "sequence": 2},
}


@pytest.mark.parametrize("strategy", list(SPLITS))
def test_param_bytes_per_strategy(strategy):
    cfg = load("tiny")
    mesh, split = MESHES[strategy], SPLITS[strategy]
    state = nnx.state(abstract_model(cfg.model))
    expected = 0
    for _, var in nnx.to_flat_state(state):
        names = var.get_metadata()["out_sharding"]
        shards = math.prod(mesh[split[n]] for n in names if n in split)
        expected += math.prod(var.shape) * var.dtype.itemsize // shards
    layout = planner.abstract_layout(mesh, strategy)
    assert planner.state_bytes(state, layout) == expected
    if strategy == "fsdp":  # every weight with an embed dim is split 8 ways; norms and the bias are whole
        whole = sum(math.prod(v.shape) * v.dtype.itemsize for _, v in nnx.to_flat_state(state))
        assert whole // 8 < expected < whole // 4


def test_plan_parts_are_consistent():
    cfg = load("tiny", ["train.microbatches=2"])
    r = planner.plan(cfg, MESHES["fsdp_tp_sp"], "fsdp_tp_sp", 8, 64)
    b = r["bytes"]
    assert (r["local_rows"], r["local_seq"]) == (2, 32)  # 8 rows / (data 2 x 2 microbatches), 64 / sequence 2
    assert b["grad_accumulator"] == b["gradients"] > 0
    assert 2 * b["gradients"] <= b["optimizer"] < 2 * b["gradients"] + 64  # AdamW mu, nu + replicated scalars
    assert b["train_total"] == sum(
        b[k] for k in ("params", "gradients", "grad_accumulator", "optimizer", "activations", "fsdp_gather")
    )
    mla = cfg.model.attention
    assert b["kv_cache"] == math.ceil(8 / 2) * 64 * cfg.model.num_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4


def test_expert_parallel_island():
    """The gather dispatch (parallel.experts) sorts the pairs of n x its tokens, so its buffers grow
    with the expert axis; the ring dispatch keeps one visiting block and less than the local trace
    saves; the tp strategies never enter the island."""
    mesh = {"data": 4, "tensor": 2, "sequence": 1}
    gather = planner.plan(load("tiny", ["runtime.expert_dispatch=gather"]), mesh, "ep_tp", 8, 64)["bytes"]
    ring = planner.plan(load("tiny", ["runtime.expert_dispatch=ring"]), mesh, "ep_tp", 8, 64)["bytes"]
    tp = planner.plan(load("tiny"), mesh, "tp", 8, 64)["bytes"]
    # On an accelerator "auto" is the ragged all_to_all (on this CPU it would be the ring).
    auto = planner.plan(load("tiny"), mesh, "ep_tp", 8, 64)["bytes"]
    assert auto == planner.plan(load("tiny", ["runtime.expert_dispatch=all_to_all"]), mesh, "ep_tp", 8, 64)["bytes"]
    assert auto != ring
    assert gather["expert_island"] > 0 and tp["expert_island"] == 0
    assert gather["activations"] == tp["activations"] + gather["expert_island"]  # same local problem otherwise
    assert ring["activations"] == tp["activations"] + ring["expert_island"] < gather["activations"]


def test_mesh_parsing():
    assert planner.parse_mesh("data=64,tensor=8,sequence=4") == {"data": 64, "tensor": 8, "sequence": 4}
    assert planner.parse_mesh("tensor=4") == {"data": 1, "tensor": 4, "sequence": 1}
    assert planner.resolve_mesh(planner.parse_mesh("data=-1,tensor=8"), 64) == {"data": 8, "tensor": 8, "sequence": 1}
    for bad in ("data=64,tensr=8", "data=x", "data", "data=0", "data=2,data=2", ""):
        with pytest.raises(planner.PlanError, match="data, tensor, sequence"):
            planner.parse_mesh(bad)
    with pytest.raises(planner.PlanError, match="--devices"):
        planner.resolve_mesh(planner.parse_mesh("data=-1"), None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "data=64;tensor=8"], "expected comma-separated AXIS=SIZE with AXIS one of data, tensor, sequence"),
        (["--mesh", "data=2", "--strategy", "zero3"], "unknown sharding strategy 'zero3'; valid: dp, fsdp"),
        (
            ["--mesh", "tensor=3", "--strategy", "tp"],
            "num_heads = 4 cannot be split over mesh axis 'tensor' (3 devices)",
        ),
        (
            ["--mesh", "data=3", "--strategy", "fsdp", "--batch", "6"],
            "cannot be split over mesh axis 'data' (3 devices)",
        ),
        (["--mesh", "data=3", "--batch", "8"], "batch 8 is not divisible by data (3)"),
        (["--mesh", "sequence=2", "--strategy", "fsdp"], "maps nothing onto them"),
        (["--mesh", "data=2", "--chip", "tpu9"], "unknown chip 'tpu9'"),
    ],
)
def test_cli_errors(capsys, argv, message):
    assert planner_main(["--config", "tiny", "--seq", "64", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_cli_deepseek_v3(capsys):
    argv = [
        "--config",
        "deepseek_v3",
        "--mesh",
        "data=64,tensor=8,sequence=4",
        "--strategy",
        "fsdp_tp_sp",
        "--batch",
        "256",
        "--seq",
        "4096",
        "--chip",
        "v5p",
    ]
    assert planner_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    b = r["bytes"]
    assert r["devices"] == 2048 and (r["local_rows"], r["local_seq"]) == (4, 1024) and r["remat"] == "full"
    assert all(
        b[k] > 0
        for k in ("params", "gradients", "optimizer", "activations", "activations_saved", "fsdp_gather", "kv_cache")
    )
    assert b["train_total"] == sum(
        b[k] for k in ("params", "gradients", "grad_accumulator", "optimizer", "activations", "fsdp_gather")
    )
    assert r["chips"]["v5p"]["train"] == (b["train_total"] <= 95 * 2**30) and list(r["chips"]) == ["v5p"]
    assert any(line.startswith("v5p") for line in lines)
    step = r["step_time"]  # --chip adds the step-time table: one line per term that costs time
    assert any(line.startswith("step time on 2048 x v5p:") for line in lines) and step["step_s"] > 0
    assert step["step_s"] == pytest.approx(sum(step["terms_s"].values()))
    assert sum(any(line.startswith(f"  {t} ") for line in lines) for t, v in step["terms_s"].items() if v) >= 4
    # 671B bf16 weights: the experts (most of them) are split over data x tensor = 512 devices; the
    # attention up-projections over tensor only and the norms not at all, so a little more.
    total = count_params(load("deepseek_v3").model)["total"]
    assert 1.0 <= b["params"] / (total * 2 / 512) < 1.5
    # remat full keeps each layer's input x [4, 1024, 7168] in bfloat16, and activations hold them all
    assert r["saved_per_layer"]["dense"] == 4 * 1024 * 7168 * 2
    assert b["activations_saved"] < b["activations"]
    assert b["optimizer"] >= 2 * b["gradients"]  # AdamW moments in the parameters' bfloat16
