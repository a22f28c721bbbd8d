"""deepseek_v3: the full DeepSeek-V3 shape (671B total, ~37B active per token).

Never instantiated in tests except abstractly (``jax.eval_shape``); use it for parameter
counts, memory planning, and as the target of ``model.hf_import`` for the real weights.
"""

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, RopeConfig, RuntimeConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="deepseek_v3",
        model=ModelConfig(
            vocab_size=129280,
            d_model=7168,
            num_layers=61,
            first_k_dense=3,
            d_ff=18432,
            max_seq_len=163840,
            init_std=0.006,
            norm_eps=1e-6,
            param_dtype="bfloat16",
            compute_dtype="bfloat16",
            attention=AttentionConfig(
                kind="mla",
                num_heads=128,
                q_lora_rank=1536,
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
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
            moe=MoEConfig(
                num_experts=256,
                experts_per_token=8,
                num_shared_experts=1,
                d_ff=2048,
                n_group=8,
                topk_group=4,
                score_func="sigmoid",
                group_score="top2_sum",
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                bias_update_rate=1e-3,
                seq_aux_loss_coef=1e-4,
            ),
        ),
        runtime=RuntimeConfig(remat="full"),
        train=TrainConfig(global_batch_size=15360, seq_len=4096, learning_rate=2.2e-4, out_dir="runs/deepseek_v3"),
    )
