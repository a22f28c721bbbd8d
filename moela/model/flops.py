"""Training FLOPs per token and parameter counts, by part, from a model config.

Convention (named in every output as ``CONVENTION``): a matmul with P parameters costs
2·P FLOPs per token forward and 4·P backward, so 6·P in training; embedding lookups cost
0; norms and activations are not counted. Multi-token-prediction depths (``model.mtp_depth``)
count like layers, with their projection and one more pass of the LM head each. Only the
parameters a token touches count: k of E routed experts, every shared expert, the router. The attention-score term adds,
per layer and token, 6·H·S_eff·(K + V) for QK^T and AV (MLA: K = nope + rope over the
expanded keys, V = v_head_dim), where S_eff = (S+1)/2 with causal halving (the default) and S
without it.

Scaling-law budgets use this count: C = flops_per_token · D, and the N of "C = 6·N·D" is
``flops_per_token / 6`` (so C = 6·N·D holds exactly; N includes the LM head and the attention
scores, and counts active parameters only). ``param_summary`` gives that N beside the plain
counts and DeepSeek LLM's quantities (arXiv:2401.02954 sec. 3.1, eq. 2):

* N1, "non-embedding" parameters: the matmuls of the layers (active ones, for MoE), without
  the embedding table and without the LM head;
* N2, "complete" parameters: N1 plus one vocabulary matrix (the LM head's matmul);
* M, non-embedding FLOPs per token: 6·N1 + the attention scores over the *whole* sequence
  (no causal halving): for dense multi-head attention with a 4·D-equivalent MLP this is the
  paper's 72·n_layer·d_model² + 12·n_layer·d_model·l_seq. ``training_flops_per_token``'s
  ``deepseek_m`` is the total minus the LM head at the chosen ``causal_halving``: the paper's M
  is that with ``causal_halving=False`` (``param_summary``'s ``deepseek_m``).
"""

from __future__ import annotations

from moela.configs.schema import Config, ModelConfig
from moela.model.params import count_params

CONVENTION = "6*N_active matmul params (embedding lookup 0, LM head counted) + attention scores 6*H*S_eff*(K+V)"
SCALING_CONVENTION = "C = 6*N*D with N = flops_per_token/6 (" + CONVENTION + ", S_eff=(S+1)/2 causal)"


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal_halving: bool = True) -> dict:
    """FLOPs per trained token: {part: flops} plus ``total``, ``forward_total``, ``deepseek_m``."""
    counts = count_params(cfg)
    e = cfg.moe
    routed_active = counts["routed_experts"] * e.experts_per_token // e.num_experts if e.num_experts else 0
    head_params = counts["lm_head"] if not cfg.tie_embeddings else counts["embedding"]
    a = cfg.attention
    s_eff = (seq_len + 1) / 2 if causal_halving else seq_len
    blocks = cfg.num_layers + cfg.mtp_depth  # each multi-token-prediction depth runs one more block
    parts = {
        "embedding": 0,
        "attention_projections": 6 * counts["attention"],
        "attention_scores": int(round(6 * blocks * a.num_heads * s_eff * (a.qk_head_dim + a.out_head_dim))),
        "dense_mlp": 6 * counts["dense_mlp"],
        "routed_experts": 6 * routed_active,
        "shared_experts": 6 * counts["shared_experts"],
        "router": 6 * counts["router"],
        "lm_head": 6 * head_params * (1 + cfg.mtp_depth),  # the shared head scores every MTP depth too
        "mtp_proj": 6 * counts["mtp_proj"],
    }
    total = sum(parts.values())
    return {
        **parts,
        "total": total,
        "forward_total": total // 3,
        "deepseek_m": total - parts["lm_head"],
        "six_n_active": 6 * (counts["active"] - counts["embedding"] + (head_params if cfg.tie_embeddings else 0)),
        "seq_len": seq_len,
        "causal_halving": causal_halving,
        "convention": CONVENTION,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """The scaling-law count: training FLOPs per token at ``seq_len`` with causal halving."""
    return training_flops_per_token(cfg, seq_len)["total"]


def param_summary(cfg: Config | ModelConfig, seq_len: int | None = None) -> dict:
    """Parameter counts and per-token FLOPs of one config, every number named by its convention.

    ``seq_len`` defaults to ``train.seq_len`` for a :class:`Config` and ``max_seq_len`` for a
    bare :class:`ModelConfig`. Keys: ``total``, ``active``, ``embedding``, ``lm_head``,
    ``non_embedding`` (total - embedding table, LM head kept: ``model.params``' convention),
    ``active_non_embedding``; ``n1``/``n2``/``deepseek_m``, ``six_n1_over_m``, ``six_n2_over_m``
    (DeepSeek LLM, see the module docstring); ``flops_per_token`` and ``n_6nd`` =
    flops_per_token / 6 (the N of C = 6·N·D); ``seq_len`` and ``convention``.
    """
    model = cfg.model if isinstance(cfg, Config) else cfg
    if seq_len is None:
        seq_len = cfg.train.seq_len if isinstance(cfg, Config) else model.max_seq_len
    counts = count_params(model)
    causal = training_flops_per_token(model, seq_len)
    full = training_flops_per_token(model, seq_len, causal_halving=False)
    head = full["lm_head"] // 6
    n1 = (full["total"] - full["attention_scores"]) // 6 - head
    m = full["total"] - full["lm_head"]
    return {
        "total": counts["total"],
        "active": counts["active"],
        "embedding": counts["embedding"],
        "lm_head": head,
        "non_embedding": counts["non_embedding"],
        "active_non_embedding": counts["active_non_embedding"],
        "n1": n1,
        "n2": n1 + head,
        "deepseek_m": m,
        "six_n1_over_m": 6 * n1 / m,
        "six_n2_over_m": 6 * (n1 + head) / m,
        "flops_per_token": causal["total"],
        "n_6nd": causal["total"] / 6,
        "seq_len": seq_len,
        "convention": SCALING_CONVENTION,
    }
