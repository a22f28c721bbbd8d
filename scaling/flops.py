"""Training FLOPs per token, by part, from a model config.

Convention (named in every output as ``CONVENTION``): a matmul with P parameters costs
2·P FLOPs per token forward and 4·P backward, so 6·P in training; embedding lookups cost
0; norms and activations are not counted. Only the parameters a token touches count:
k of E routed experts, every shared expert, the router. The attention-score term adds,
per layer and token, 6·H·S_eff·(K + V) for QK^T and AV (MLA: K = nope + rope over the
expanded keys, V = v_head_dim), where S_eff = S/2 with causal halving (the default) and S
without it. DeepSeek's M (non-embedding FLOPs per token) is the total minus the LM head.
"""

from __future__ import annotations

from configs.schema import ModelConfig
from model.params import count_params

CONVENTION = "6*N_active matmul params (embedding lookup 0, LM head counted) + attention scores 6*H*S_eff*(K+V)"


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal_halving: bool = True) -> dict:
    """FLOPs per trained token: {part: flops} plus ``total``, ``forward_total``, ``deepseek_m``."""
    counts = count_params(cfg)
    e = cfg.moe
    routed_active = counts["routed_experts"] * e.experts_per_token // e.num_experts if e.num_experts else 0
    head_params = counts["lm_head"] if not cfg.tie_embeddings else counts["embedding"]
    a = cfg.attention
    s_eff = (seq_len + 1) / 2 if causal_halving else seq_len
    parts = {
        "embedding": 0,
        "attention_projections": 6 * counts["attention"],
        "attention_scores": int(round(6 * cfg.num_layers * a.num_heads * s_eff * (a.qk_head_dim + a.out_head_dim))),
        "dense_mlp": 6 * counts["dense_mlp"],
        "routed_experts": 6 * routed_active,
        "shared_experts": 6 * counts["shared_experts"],
        "router": 6 * counts["router"],
        "lm_head": 6 * head_params,
    }
    total = sum(parts.values())
    return {**parts, "total": total, "forward_total": total // 3, "deepseek_m": total - parts["lm_head"],
            "six_n_active": 6 * (counts["active"] - counts["embedding"] + (head_params if cfg.tie_embeddings else 0)),
            "seq_len": seq_len, "causal_halving": causal_halving, "convention": CONVENTION}
