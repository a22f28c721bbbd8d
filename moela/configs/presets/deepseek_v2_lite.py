"""deepseek_v2_lite: DeepSeek-V2-Lite (15.7B total, 2.4B active; softmax routing, no q-LoRA)."""

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, RopeConfig, RuntimeConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="deepseek_v2_lite",
        model=ModelConfig(
            vocab_size=102400,
            d_model=2048,
            num_layers=27,
            first_k_dense=1,
            d_ff=10944,
            max_seq_len=163840,
            init_std=0.006,
            norm_eps=1e-6,
            param_dtype="bfloat16",
            compute_dtype="bfloat16",
            attention=AttentionConfig(
                kind="mla",
                num_heads=16,
                q_lora_rank=0,
                kv_lora_rank=512,
                qk_nope_head_dim=128,
                qk_rope_head_dim=64,
                v_head_dim=128,
            ),
            rope=RopeConfig(
                theta=10000.0,
                scaling="yarn",
                factor=40.0,
                original_max_position=4096,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=0.707,
                mscale_all_dim=0.707,
            ),
            moe=MoEConfig(
                num_experts=64,
                experts_per_token=6,
                num_shared_experts=2,
                d_ff=1408,
                n_group=1,
                topk_group=1,
                score_func="softmax",
                group_score="max",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
            ),
        ),
        runtime=RuntimeConfig(remat="full"),
        train=TrainConfig(global_batch_size=4608, seq_len=4096, learning_rate=4.2e-4, out_dir="runs/deepseek_v2_lite"),
    )
