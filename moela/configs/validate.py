"""Cross-field rules of a :class:`~moela.configs.schema.Config`, checked before any compute.

Each rule raises :class:`ConfigError` naming the dotted key(s) involved and the values that
would be valid.
"""

from __future__ import annotations

import dataclasses
import math

from moela.configs.schema import Config, parse_mixture


class ConfigError(ValueError):
    """A configuration mistake, reported before any compute."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"config key '{prefix}.{name}' = {value} must be > 0")


def _finite(node: object, prefix: str) -> None:
    """Every float in the config is a finite number (``--set train.learning_rate=inf`` parses)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            _finite(value, key)
        elif isinstance(value, float):
            _require(math.isfinite(value), f"config key '{key}' = {value} must be a finite number")


def validate(cfg: Config) -> Config:
    _finite(cfg, "")
    m, a, r, e = cfg.model, cfg.model.attention, cfg.model.rope, cfg.model.moe
    _positive(m, "model", "vocab_size", "d_model", "num_layers", "d_ff", "max_seq_len", "init_std", "norm_eps")
    _positive(a, "model.attention", "num_heads")
    _require(
        0 <= m.first_k_dense <= m.num_layers,
        f"config key 'model.first_k_dense' = {m.first_k_dense} must be between 0 and model.num_layers = {m.num_layers}",
    )

    if a.kind == "mla":
        _positive(a, "model.attention", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        _require(
            a.q_lora_rank >= 0,
            f"config key 'model.attention.q_lora_rank' = {a.q_lora_rank} must be >= 0 (0 = direct query projection)",
        )
    else:
        _positive(a, "model.attention", "num_kv_heads", "head_dim")
        _require(
            a.num_heads % a.num_kv_heads == 0,
            f"config key 'model.attention.num_kv_heads' = {a.num_kv_heads} must divide "
            f"model.attention.num_heads = {a.num_heads}; valid: "
            f"{[d for d in range(1, a.num_heads + 1) if a.num_heads % d == 0]}",
        )
    _require(
        a.rope_dim % 2 == 0,
        f"the rotary dimension ({'model.attention.qk_rope_head_dim' if a.kind == 'mla' else 'model.attention.head_dim'}"
        f" = {a.rope_dim}) must be even: RoPE rotates pairs",
    )

    _positive(r, "model.rope", "theta")
    if r.scaling == "yarn":
        _require(r.factor >= 1.0, f"config key 'model.rope.factor' = {r.factor} must be >= 1 with yarn scaling")
        _positive(r, "model.rope", "original_max_position", "beta_fast", "beta_slow")
        _require(
            r.beta_fast > r.beta_slow,
            f"config key 'model.rope.beta_fast' = {r.beta_fast} must exceed model.rope.beta_slow = {r.beta_slow}",
        )

    _require(
        e.num_experts >= 0,
        f"config key 'model.moe.num_experts' = {e.num_experts} must be >= 0 (0 = dense MLP in every layer)",
    )
    if e.num_experts > 0:
        _positive(e, "model.moe", "experts_per_token", "d_ff", "n_group", "topk_group", "routed_scaling_factor")
        _require(e.num_shared_experts >= 0, "config key 'model.moe.num_shared_experts' must be >= 0")
        _require(
            e.experts_per_token <= e.num_experts,
            f"config key 'model.moe.experts_per_token' = {e.experts_per_token} must be <= "
            f"model.moe.num_experts = {e.num_experts}",
        )
        _require(
            e.num_experts % e.n_group == 0,
            f"config key 'model.moe.n_group' = {e.n_group} must divide model.moe.num_experts = {e.num_experts}; "
            f"valid: {[d for d in range(1, e.num_experts + 1) if e.num_experts % d == 0]}",
        )
        _require(
            e.topk_group <= e.n_group,
            f"config key 'model.moe.topk_group' = {e.topk_group} must be <= model.moe.n_group = {e.n_group}",
        )
        per_group = e.num_experts // e.n_group
        _require(
            e.experts_per_token <= e.topk_group * per_group,
            f"config key 'model.moe.experts_per_token' = {e.experts_per_token} exceeds the experts in the "
            f"selected groups (topk_group {e.topk_group} x {per_group} experts per group)",
        )
        _require(
            e.group_score != "top2_sum" or e.n_group == 1 or per_group >= 2,
            "config key 'model.moe.group_score' = 'top2_sum' needs at least 2 experts per group; "
            "use 'max' or fewer groups",
        )
        _require(e.seq_aux_loss_coef >= 0, "config key 'model.moe.seq_aux_loss_coef' must be >= 0")

    _require(m.mtp_depth >= 0, f"config key 'model.mtp_depth' = {m.mtp_depth} must be >= 0 (0 = no MTP modules)")
    _positive(cfg.runtime, "runtime", "grouped_block_rows")
    _require(
        cfg.runtime.expert_capacity >= 0,
        f"config key 'runtime.expert_capacity' = {cfg.runtime.expert_capacity} must be >= 0 (0 = dropless; "
        "c > 0 sizes the all_to_all expert buffers at c times the average load)",
    )

    t = cfg.train
    _positive(t, "train", "steps", "global_batch_size", "seq_len", "microbatches", "learning_rate", "loss_chunk_tokens")
    _require(t.mtp_loss_weight >= 0, f"config key 'train.mtp_loss_weight' = {t.mtp_loss_weight} must be >= 0")
    _positive(t, "train", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every", "eps")
    _require(
        0 <= t.warmup_steps <= t.steps,
        f"config key 'train.warmup_steps' = {t.warmup_steps} must be between 0 and train.steps = {t.steps} "
        "(the warmup is part of the run)",
    )
    _require(
        0 <= t.min_lr_ratio <= 1,
        f"config key 'train.min_lr_ratio' = {t.min_lr_ratio} must be in [0, 1] (the final learning rate "
        "as a fraction of the peak)",
    )
    for name in ("b1", "b2"):
        value = getattr(t, name)
        _require(0 <= value < 1, f"config key 'train.{name}' = {value} must be in [0, 1) (an AdamW moment decay)")
    for name, meaning in (("weight_decay", "0 = off"), ("grad_clip", "0 = off"), ("z_loss", "0 = off")):
        value = getattr(t, name)
        _require(value >= 0, f"config key 'train.{name}' = {value} must be >= 0 ({meaning})")
    _require(t.seed >= 0, f"config key 'train.seed' = {t.seed} must be >= 0")
    _require(
        t.peak_flops >= 0,
        f"config key 'train.peak_flops' = {t.peak_flops} must be >= 0 (FLOP/s per device; 0 = from the device table)",
    )
    _require(bool(t.out_dir.strip()), "config key 'train.out_dir' is empty; give a run directory, e.g. runs/tiny")
    _require(
        t.global_batch_size % t.microbatches == 0,
        f"config key 'train.microbatches' = {t.microbatches} must divide train.global_batch_size = "
        f"{t.global_batch_size}",
    )
    _require(
        t.seq_len <= m.max_seq_len,
        f"config key 'train.seq_len' = {t.seq_len} exceeds the model's context model.max_seq_len = {m.max_seq_len}; "
        "lower train.seq_len, or raise model.max_seq_len (to extend a trained rope context, also set "
        "model.rope.scaling=yarn with model.rope.factor >= max_seq_len / model.rope.original_max_position)",
    )

    d = cfg.data
    for key, meaning in (
        ("max_documents", "all"),
        ("shards", "one per process"),
        ("workers", "no worker processes"),
        ("shuffle_rows", "off"),
    ):
        _require(getattr(d, key) >= 0, f"config key 'data.{key}' = {getattr(d, key)} must be >= 0 (0 = {meaning})")
    _positive(d, "data", "prefetch", "tokenizer_sentences")
    if d.mixture:
        try:
            parse_mixture(d.mixture)
        except ValueError as e:
            raise ConfigError(f"config key 'data.mixture': {e}") from None
    _require(
        d.shards == 0 or t.global_batch_size % d.shards == 0,
        f"config key 'data.shards' = {d.shards} must divide train.global_batch_size = {t.global_batch_size}",
    )
    for name in ("data", "tensor", "sequence"):
        size = getattr(cfg.mesh, name)
        _require(size == -1 or size >= 1, f"config key 'mesh.{name}' = {size} must be >= 1, or -1 (fill)")
    _require(
        [cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.sequence].count(-1) <= 1,
        "at most one of mesh.data, mesh.tensor, mesh.sequence may be -1",
    )

    s = cfg.serve
    _positive(s, "serve", "page_size", "num_pages", "max_batch", "max_batched_tokens", "max_new_tokens")
    _require(s.temperature >= 0, f"config key 'serve.temperature' = {s.temperature} must be >= 0")
    _require(0 < s.top_p <= 1, f"config key 'serve.top_p' = {s.top_p} must be in (0, 1]")
    _require(s.top_k >= 0, f"config key 'serve.top_k' = {s.top_k} must be >= 0 (0 = off)")
    _require(
        s.speculative_tokens >= 0,
        f"config key 'serve.speculative_tokens' = {s.speculative_tokens} must be >= 0 (0 = no speculation)",
    )
    _require(
        s.speculative_tokens == 0 or m.mtp_depth >= 1,
        f"config key 'serve.speculative_tokens' = {s.speculative_tokens} needs an MTP module to draft with, "
        "but model.mtp_depth = 0; valid: serve.speculative_tokens=0, or a model trained or imported with MTP",
    )
    _require(
        s.speculative_tokens < s.max_batched_tokens,
        f"config key 'serve.speculative_tokens' = {s.speculative_tokens} must be below serve.max_batched_tokens = "
        f"{s.max_batched_tokens} (a step verifies 1 + speculative_tokens tokens a sequence)",
    )
    return cfg
