"""small: an 8M-parameter MLA + MoE decoder; 1000 steps of 4096 tokens take ~25 minutes on 2 CPU cores."""

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="small",
        model=ModelConfig(
            vocab_size=8192,
            d_model=256,
            num_layers=4,
            first_k_dense=1,
            d_ff=768,
            max_seq_len=512,
            attention=AttentionConfig(
                kind="mla",
                num_heads=4,
                q_lora_rank=96,
                kv_lora_rank=64,
                qk_nope_head_dim=32,
                qk_rope_head_dim=16,
                v_head_dim=32,
            ),
            moe=MoEConfig(
                num_experts=8,
                experts_per_token=2,
                num_shared_experts=1,
                d_ff=128,
                n_group=2,
                topk_group=1,
                routed_scaling_factor=2.5,
            ),
        ),
        train=TrainConfig(
            steps=1000,
            global_batch_size=16,
            seq_len=256,
            learning_rate=2e-3,
            warmup_steps=50,
            eval_every=100,
            checkpoint_every=100,
            log_every=10,
            out_dir="runs/small",
        ),
    )
