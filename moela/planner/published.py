"""Published training runs, and the step-time model's prediction for each.

    python -m moela.planner.published            # the table: published, predicted, ratio

Each run is stated as its authors configured it (model dims, chips, batch, sequence, parallelism,
remat, dtypes) with its source. Published figures are converted to one convention before they are
compared: the **step time** (seconds), derived from the published tokens/s/chip or TFLOP/s/chip
with the authors' own FLOP formula. The step time depends on no convention, so predicted /
published step time is the honest ratio; the MFU column restates both in moela's convention
(``moela.model.flops``: causal attention, LM head counted once, 6·N_active) over the bf16 peak.

Calibration: the two runs marked ``calibration`` (MaxText DeepSeek-V3 on 512 v5p, MaxText
Mixtral-8x7B on v5p) were looked at while the model's assumptions were chosen; every other run is a
check. Sources, quotes and the conventions of each: docs/step_time.md.
"""

from __future__ import annotations

import dataclasses
import sys

from moela.configs import load
from moela.configs.schema import AttentionConfig, ModelConfig, MoEConfig
from moela.planner.chips import CHIPS
from moela.planner.steptime import Parallelism, Remat, Workload, model_flops_per_token, step_time


def dense(
    d: int, heads: int, ff: int, layers: int, vocab: int, kv_heads: int | None = None, head_dim: int = 128
) -> ModelConfig:
    """A Llama-style dense decoder (GQA, SwiGLU, untied embeddings), parameters only (never built)."""
    attention = AttentionConfig(kind="gqa", num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim)
    return ModelConfig(
        vocab_size=vocab, d_model=d, num_layers=layers, d_ff=ff, max_seq_len=131072, attention=attention,
        param_dtype="bfloat16", compute_dtype="bfloat16",
    )  # fmt: skip


def mixtral(
    d: int, layers: int, ff: int, experts: int, heads: int = 32, kv: int = 8, vocab: int = 32000
) -> ModelConfig:
    base = dense(d, heads, ff, layers, vocab, kv)
    return dataclasses.replace(
        base, first_k_dense=0, moe=MoEConfig(num_experts=experts, experts_per_token=2, num_shared_experts=0, d_ff=ff)
    )


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    model: ModelConfig
    chip: str
    par: Parallelism
    batch: int  # global sequences per step
    seq: int
    remat: str | Remat
    published_step_s: float  # derived from the published figure (see ``note``)
    source: str
    note: str
    microbatches: int = 1
    param_bytes: int = 4  # MaxText's default weight_dtype is float32
    capacity_factor: float = 0.0
    fp8: bool = False
    dispatch: tuple[str, ...] = ()  # how the run's expert exchange differs from moela's (Workload)
    calibration: bool = False


def _maxtext_step(tflops_per_device: float, per_device_tokens: float, flops_per_token: float) -> float:
    return per_device_tokens * flops_per_token / (tflops_per_device * 1e12)


def runs() -> list[Run]:
    ds = load("deepseek_v3").model
    mix7 = mixtral(4096, 32, 14336, 8)
    mix22 = mixtral(6144, 56, 16384, 8, heads=48, vocab=32768)
    synthetic = {  # MaxText's global_parameter_scale models (emb, heads, mlp, layers), MHA, head 128
        32: dense(8192, 64, 28672, 32, 32000),
        64: dense(8192, 64, 28672, 64, 32000),
        128: dense(8192, 128, 57344, 64, 32000),
        256: dense(16384, 128, 57344, 64, 32000),
        512: dense(16384, 128, 57344, 128, 32000),
        1024: dense(16384, 256, 114688, 128, 32000),
    }
    llama31_70b = dense(8192, 64, 28672, 80, 128256, kv_heads=8)
    llama2_70b = dense(8192, 64, 28672, 80, 32000, kv_heads=8)
    llama31_8b = dense(4096, 32, 14336, 32, 128256, kv_heads=8)
    llama31_405b = dense(16384, 128, 53248, 126, 128256, kv_heads=8)
    v5p_readme = "MaxText README 'Runtime Performance Results' (v5p, S=2048, pdb as in configs/v5p/*.sh)"

    def from_mfu(model, mfu, chip, seq, per_device_batch, causal=False):
        """Step time from a published MFU (MaxText: non-causal before July 2025)."""
        tokens = per_device_batch * seq
        return tokens * model_flops_per_token(model, seq, causal) / (mfu * CHIPS[chip].bf16_flops)

    out = [
        Run(
            "MaxText DeepSeek-V3 671B",
            ds,
            "v5p",
            Parallelism(fsdp=512),
            3072,
            8192,
            "full",
            90.668,
            "tpu-recipes training/v5p/DeepSeek3-671B-MaxText (log: 'seconds: 90.668, TFLOP/s/device: 152.415'); "
            "config maxtext@3eb77db3c deepseek3_671b_v5p_1024",
            "pdb 6, fsdp 512, remat custom (layer input and out_proj offloaded, rest recomputed), f32 weights, "
            "megablox dropless",
            calibration=True,
        ),
        Run(
            "MaxText Mixtral-8x7B",
            mix7,
            "v5p",
            Parallelism(fsdp=128),
            36 * 128,
            4096,
            "full",
            36 * 4096 / 2909,
            "maxtext docs/reference/models/tiering.md (52.56% MFU, 2,909 tokens/s/device); tpu-recipes "
            "training/v5p/Mixtral-8X7B-Maxtext",
            "pdb 36, fsdp, base.yml remat full, bf16 weights, dropless",
            param_bytes=2,
            calibration=True,
        ),
    ]
    for scale, chips, mfu, tensor, pdb, remat in (
        (32, 64, 0.6776, 4, 6, "dots_no_batch"),
        (64, 64, 0.7031, 4, 3, "dots_no_batch"),
        (128, 128, 0.6868, 8, 1, "dots_no_batch"),
        (128, 256, 0.6853, 8, 1, "dots_no_batch"),
        (256, 512, 0.6882, 8, 1, "dots_no_batch"),
        (512, 512, 0.6399, 8, 2, "full"),
        (1024, 1024, 0.6405, 16, 2, "full"),
        (1024, 2048, 0.6480, 16, 2, "full"),
    ):
        model = synthetic[scale]
        out.append(
            Run(
                f"MaxText dense {scale}B",
                model,
                "v5p",
                Parallelism(fsdp=chips // tensor, tensor=tensor),
                pdb * chips,
                2048,
                remat,
                from_mfu(model, mfu, "v5p", 2048, pdb),
                v5p_readme,
                f"{mfu:.2%} MFU (non-causal), pdb {pdb}, fsdp x tensor {tensor}, "
                f"remat {'minimal' if remat != 'full' else 'full'}",
            )
        )
    v4_22b = dense(6144, 24, 24576, 48, 32000, head_dim=256)
    out += [
        Run(
            "MaxText dense 22B",
            v4_22b,
            "v4",
            Parallelism(fsdp=64),
            13 * 64,
            2048,
            "full",
            from_mfu(v4_22b, 0.567, "v4", 2048, 13),
            "MaxText configs/tpu/v4/README.md (1x v4-128: 56.7% MFU)",
            "pdb 13, fsdp 64, remat full",
        ),
        Run(
            "MaxText Llama 3.1 70B",
            llama31_70b,
            "v6e",
            Parallelism(fsdp=256),
            5 * 256,
            8192,
            "full",
            from_mfu(llama31_70b, 0.5033, "v6e", 8192, 5),
            "maxtext docs/reference/models/tiering.md (v6e, 50.33%)",
            "pdb 5, fsdp 256, remat custom (qkv and layer input offloaded)",
        ),
        Run(
            "MaxText Llama 2 70B",
            llama2_70b,
            "v5p",
            Parallelism(fsdp=512),
            4 * 512,
            4096,
            Remat(2 / 7, 0, 1),
            from_mfu(llama2_70b, 0.654, "v5p", 4096, 4),
            "maxtext docs/reference/models/tiering.md (v5p, 65.4%)",
            "pdb 4, fsdp, remat save_dot_except_mlpwi (the MLP's input matmuls recomputed)",
        ),
        Run(
            "MaxText Mixtral-8x22B",
            mix22,
            "v6e",
            Parallelism(fsdp=64, expert=4),
            8 * 256,
            4096,
            "full",
            8 * 4096 / 1326,
            "maxtext docs/reference/models/tiering.md (v6e, 36.2%, 1,326 tokens/s/device)",
            "pdb 8, fsdp 64 x expert 4, custom remat, capacity factor 1.25 (dropping), bf16 weights",
            param_bytes=2,
            capacity_factor=1.25,
        ),
        Run(
            "Megatron-Bridge DeepSeek-V3",
            ds,
            "h100",
            Parallelism(expert=64, tensor=2, pipeline=8, virtual=4),
            8192,
            4096,
            "none",
            8192 * 4096 / (1297 * 1024),
            "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md, 25.09 (1,297 tokens/s/GPU, 1024 H100)",
            "25.09: TP2 PP8 VP4 EP64, MBS 1, GA 128, FP8 matmuls, dropless, selective recompute; DeepEP dispatch "
            "(fp8, node-limited) overlapped with 1F1B compute",
            microbatches=128,
            param_bytes=2,
            fp8=True,
            dispatch=("fp8", "node_limited", "overlap"),
        ),
        Run(
            "Megatron-Bridge Llama 3 70B",
            llama31_70b,
            "h100",
            Parallelism(data=2, tensor=4, pipeline=8, virtual=5),
            128,
            8192,
            "none",
            128 * 8192 / (1602 * 64),
            "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md, 25.11 (1,602 tokens/s/GPU, 64 H100)",
            "25.11: TP4 PP8 VP5, MBS 1, GA 64, FP8 matmuls",
            microbatches=64,
            param_bytes=2,
            fp8=True,
        ),
    ]
    bridge = "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md (-archive.md for 26.04.01)"
    for name, model, chip, par, batch, seq, micro, tokens_per_gpu, note, dispatch in (
        ("Llama 3 8B", llama31_8b, "h100", Parallelism(data=8), 128, 8192, 16, 14451, "25.11: DP8, MBS 1, GA 16", ()),
        ("Llama 3 8B", llama31_8b, "b200", Parallelism(data=8), 128, 8192, 8, 30624, "25.11: DP8, MBS 2, GA 8", ()),
        (
            "Llama 3.1 405B", llama31_405b, "h100", Parallelism(data=8, tensor=8, pipeline=8, sequence=2, virtual=8),
            512, 8192, 64, 292, "25.11: TP8 PP8 CP2 VP8, MBS 1, GA 64", (),
        ),
        (
            "Llama 3.1 405B", llama31_405b, "b200", Parallelism(data=2, tensor=4, pipeline=8, sequence=2, virtual=8),
            64, 8192, 32, 661, "25.11: TP4 PP8 CP2 VP8, MBS 1, GA 32", (),
        ),
        (
            "DeepSeek-V3", ds, "b200", Parallelism(expert=32, pipeline=8, virtual=2), 4096, 4096, 128, 3328,
            "26.04.01: PP8 VP2 EP32, MBS 1, GA 128, MXFP8; DeepEP dispatch (fp8, node-limited) overlapped",
            ("fp8", "node_limited", "overlap"),
        ),
    ):  # fmt: skip
        chips = par.chips
        out.append(
            Run(
                f"Megatron-Bridge {name}",
                model,
                chip,
                par,
                batch,
                seq,
                "none",
                batch * seq / (tokens_per_gpu * chips),
                f"{bridge} ({tokens_per_gpu:,} tokens/s/GPU, {chips} {chip.upper()})",
                f"{note}, FP8 matmuls",
                microbatches=micro,
                param_bytes=2,
                fp8=True,
                dispatch=dispatch,
            )  # fmt: skip
        )
    return out


def compare(run: Run) -> dict:
    remat = run.remat if isinstance(run.remat, str) else "custom"
    work = Workload(
        run.model, run.batch, run.seq, run.microbatches, run.remat, "all_to_all", run.param_bytes, True, run.fp8,
        run.capacity_factor, "fp8" in run.dispatch, "node_limited" in run.dispatch, "overlap" in run.dispatch,
    )  # fmt: skip
    r = step_time(work, run.par, CHIPS[run.chip])
    chips = run.par.chips
    tokens = run.batch * run.seq
    flops = model_flops_per_token(run.model, run.seq, True) * tokens
    peak = CHIPS[run.chip].bf16_flops
    return {
        "run": run.name,
        "chip": run.chip,
        "chips": chips,
        "remat": remat,
        "published_step_s": run.published_step_s,
        "predicted_step_s": r["step_s"],
        "ratio": r["step_s"] / run.published_step_s,
        "published_mfu": flops / (run.published_step_s * chips * peak),
        "predicted_mfu": r["mfu"],
        "dominant": r["dominant"],
        "calibration": run.calibration,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'run':<30}{'chips':>12}{'published':>11}{'predicted':>11}{'ratio':>7}{'MFU pub':>9}{'MFU pred':>10}"
        "  dominant",
    ]
    for r in rows:
        mark = " (calibration)" if r["calibration"] else ""
        lines.append(
            f"{r['run']:<30}{r['chips']:>7} {r['chip']:<4}"
            f"{r['published_step_s']:>10.2f}s{r['predicted_step_s']:>10.2f}s"
            f"{r['ratio']:>7.2f}{r['published_mfu']:>9.1%}{r['predicted_mfu']:>10.1%}  {r['dominant']}{mark}"
        )
    return "\n".join(lines)


def main() -> int:
    rows = [compare(run) for run in runs()]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
