"""bench: the fixed shape benchmarks use, so moela can be compared with other implementations.

vocab 32000, hidden 512, 6 layers (first 1 dense, intermediate 1536), 16 routed experts top-2
+ 1 shared (intermediate 256, 4 groups, top-2 groups, scale 2.5), 8 MLA heads (q_lora 192,
kv_lora 128, nope 64, rope 32, v 64), untied embeddings: 72.9M total / 45.4M active.
Do not change it: numbers measured on it are only comparable while it stays fixed.
"""

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="bench",
        model=ModelConfig(
            vocab_size=32000,
            d_model=512,
            num_layers=6,
            first_k_dense=1,
            d_ff=1536,
            max_seq_len=2048,
            attention=AttentionConfig(
                kind="mla",
                num_heads=8,
                q_lora_rank=192,
                kv_lora_rank=128,
                qk_nope_head_dim=64,
                qk_rope_head_dim=32,
                v_head_dim=64,
            ),
            moe=MoEConfig(
                num_experts=16,
                experts_per_token=2,
                num_shared_experts=1,
                d_ff=256,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
            ),
        ),
        train=TrainConfig(global_batch_size=8, seq_len=1024, out_dir="runs/bench"),
    )
