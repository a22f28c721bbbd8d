"""dense: dense MLA decoders (no experts) for IsoFLOP sweeps on accelerators.

Shape rule: d_model ≈ 64·n_layers (multiples of 64, at most 8 widths per octave, aspect within
2x), MLA heads of 64 (+32 rope) dims = d_model/64 heads, KV latent d_model/4 (≤ 512), SwiGLU
d_ff = 8/3·d_model rounded up to 64. Sequence 2048, vocab 32768 (a tokenizer is trained on the
dataset's train split: point data.* at a real corpus with ``--set``). Covers N ≈ 2.3e6 .. 3.3e11.
"""

import dataclasses

from moela.configs.schema import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig
from moela.scaling.family import Family, ShapeRule, mla_attention, round_up


def build(base: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    return dataclasses.replace(
        base, num_layers=n_layers, d_model=d_model, d_ff=round_up(8 * d_model / 3, 64), attention=mla_attention(d_model)
    )


def get_family() -> Family:
    base = Config(
        name="dense",
        model=ModelConfig(
            vocab_size=32768,
            max_seq_len=2048,
            first_k_dense=0,
            param_dtype="float32",
            compute_dtype="bfloat16",
            moe=MoEConfig(num_experts=0),
        ),
        data=DataConfig(tokenizer_type="bpe"),
        train=TrainConfig(
            seq_len=2048, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, out_dir="runs/dense"
        ),
    )
    return Family(
        name="dense",
        base=base,
        rule=ShapeRule(build=build, width_multiple=64, aspect=64.0),
        description=__doc__.splitlines()[0],
        eval_tokens=1 << 21,
    )
