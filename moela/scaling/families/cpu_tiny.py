"""cpu_tiny: tiny dense MLA decoders whose IsoFLOP sweep runs end to end on a 2-core CPU.

N ≈ 5.2e4 .. 2.5e7 (6ND convention, scaling.flops) at sequence 128 with vocab 1024 (the sentencepiece
tokenizer trained on the embedded stdlib corpus). Shape rule: d_model ≈ 64·n_layers on
multiples of 32 from 32 (aspect within 2x), MLA heads of 64 (+32 rope) dims from d_model 128
(on this CPU ~2x the throughput of 32-dim heads) and of 32 below (two heads at d_model 64),
KV latent d_model/4, SwiGLU d_ff = 8/3·d_model rounded up to 32. The 32-wide models exist so
that budgets of 1e12-1e13 FLOPs have their optimum inside the grid: the LM head (1024 x
d_model) is most of a small model, and 64-wide ones start at N = 1.3e5.
Every run evaluates the same first 360 validation rows (46k tokens; batches divide 360).
"""

import dataclasses

from moela.configs.schema import Config, ModelConfig, MoEConfig, TrainConfig
from moela.scaling.family import Family, ShapeRule, mla_attention, round_up


def build(base: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    head_dim = 64 if d_model >= 128 else 32
    return dataclasses.replace(
        base,
        num_layers=n_layers,
        d_model=d_model,
        d_ff=round_up(8 * d_model / 3, 32),
        attention=mla_attention(d_model, head_dim=head_dim),
    )


def get_family() -> Family:
    base = Config(
        name="cpu_tiny",
        model=ModelConfig(vocab_size=1024, max_seq_len=128, first_k_dense=0, moe=MoEConfig(num_experts=0)),
        train=TrainConfig(
            seq_len=128,
            global_batch_size=20,
            learning_rate=3e-3,
            schedule="cosine",
            min_lr_ratio=0.1,
            async_checkpoints=False,
            keep_checkpoints=1,
            out_dir="runs/cpu_tiny",
        ),
    )
    rule = ShapeRule(build=build, width_multiple=32, aspect=64.0, min_width=32, max_width=512, max_layers=8)
    return Family(
        name="cpu_tiny",
        base=base,
        rule=rule,
        description=__doc__.splitlines()[0],
        batch_bounds=(4, 64),
        lr_bounds=(1e-4, 1e-2),
        eval_rows=360,
        evals_per_run=2,
        checkpoints_per_run=2,
        max_warmup=100,
    )
