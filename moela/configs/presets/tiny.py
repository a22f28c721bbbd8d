"""tiny: an MLA + MoE decoder that builds, runs and trains in seconds on a laptop CPU."""

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="tiny",
        model=ModelConfig(
            vocab_size=1024,
            d_model=64,
            num_layers=2,
            first_k_dense=1,
            d_ff=128,
            max_seq_len=256,
            attention=AttentionConfig(
                kind="mla",
                num_heads=4,
                q_lora_rank=0,
                kv_lora_rank=32,
                qk_nope_head_dim=16,
                qk_rope_head_dim=8,
                v_head_dim=16,
            ),
            moe=MoEConfig(
                num_experts=8,
                experts_per_token=2,
                num_shared_experts=1,
                d_ff=32,
                n_group=2,
                topk_group=1,
                routed_scaling_factor=2.5,
            ),
        ),
        train=TrainConfig(
            steps=300,
            global_batch_size=8,
            seq_len=128,
            learning_rate=3e-3,
            warmup_steps=20,
            eval_every=100,
            checkpoint_every=100,
            log_every=10,
            out_dir="runs/tiny",
        ),
    )
