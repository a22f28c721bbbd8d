"""moe: MLA + DeepSeekMoE decoders for IsoFLOP sweeps on accelerators.

Shape rule: d_model ≈ 64·n_layers as in ``dense`` (at least 2 layers: the first is dense),
MLA heads of 64 dims, 16 routed experts top-2 (4 groups, top-2 groups, sigmoid routing,
aux-loss-free bias) plus 1 shared expert, each expert's d_ff = d_model/2 rounded up to 64 (it
scales with width; E and k stay fixed), the dense first layer's SwiGLU 8/3·d_model. N counts
active parameters (scaling.flops). Sequence 2048, vocab 32768. Covers N ≈ 2.5e6 .. 2.1e11.
"""

import dataclasses

from moela.configs.schema import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig
from moela.scaling.family import Family, ShapeRule, mla_attention, round_up


def build(base: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    return dataclasses.replace(
        base,
        num_layers=n_layers,
        d_model=d_model,
        d_ff=round_up(8 * d_model / 3, 64),
        attention=mla_attention(d_model),
        moe=dataclasses.replace(base.moe, d_ff=round_up(d_model / 2, 64)),
    )


def get_family() -> Family:
    base = Config(
        name="moe",
        model=ModelConfig(
            vocab_size=32768,
            max_seq_len=2048,
            first_k_dense=1,
            param_dtype="float32",
            compute_dtype="bfloat16",
            moe=MoEConfig(
                num_experts=16,
                experts_per_token=2,
                num_shared_experts=1,
                n_group=4,
                topk_group=2,
                score_func="sigmoid",
                routed_scaling_factor=2.5,
                bias_update_rate=1e-3,
                seq_aux_loss_coef=1e-4,
            ),
        ),
        data=DataConfig(tokenizer_type="bpe"),
        train=TrainConfig(
            seq_len=2048, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, out_dir="runs/moe"
        ),
    )
    return Family(
        name="moe",
        base=base,
        rule=ShapeRule(build=build, width_multiple=64, aspect=64.0, min_layers=2),
        description=__doc__.splitlines()[0],
        eval_tokens=1 << 21,
    )
