"""Parameter counts computed from a config, abstractly (``jax.eval_shape``: nothing allocated).

    python -m moela.model.params --config deepseek_v3 [--set key=value ...]

Prints a table by part and, as its last line, one JSON object with at least ``total`` and
``active``. Conventions: ``active`` counts the parameters one token touches (all but the
routed experts it is not sent to: k of E per MoE layer), embedding lookup included;
``embedding`` is the input table only, so ``non_embedding`` keeps the LM head (a matmul).
The aux-loss-free router bias is state, not a parameter, and is not counted. Multi-token-prediction
modules (``model.mtp_depth``) count in every total, by role, and on their own as ``mtp``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from flax import nnx

from moela.configs.loader import config_from_cli
from moela.configs.schema import ModelConfig
from moela.model.transformer import abstract_model

PARTS = (
    "embedding",
    "lm_head",
    "attention",
    "norms",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "mtp_proj",
)


def _part(path: tuple) -> str:
    """The part a parameter belongs to, by role: a multi-token-prediction module's block and norms
    count with the model's (its attention under ``attention``, ...), its projection as ``mtp_proj``."""
    names = [str(p) for p in path]
    if names[0] == "mtp":
        return "mtp_proj" if names[2] == "proj" else _part(path[2:])
    if names[0] == "embed":
        return "embedding"
    if names[0] == "lm_head":
        return "lm_head"
    if names[-1] == "scale":
        return "norms"
    if "attn" in names:
        return "attention"
    if "experts" in names:
        return "routed_experts"
    if "shared" in names:
        return "shared_experts"
    if "router" in names:
        return "router"
    return "dense_mlp"


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Counts by part plus ``total``, ``active``, ``non_embedding``, ``active_non_embedding`` and
    ``mtp`` (the multi-token-prediction modules' share of the total, their blocks included)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    parts = dict.fromkeys(PARTS, 0)
    mtp = 0
    for path, leaf in nnx.to_flat_state(state):
        parts[_part(path)] += math.prod(leaf.shape)
        mtp += math.prod(leaf.shape) if str(path[0]) == "mtp" else 0
    total = sum(parts.values())
    e = cfg.moe
    inactive = parts["routed_experts"] * (e.num_experts - e.experts_per_token) // e.num_experts if e.num_experts else 0
    return {
        **parts,
        "total": total,
        "active": total - inactive,
        "non_embedding": total - parts["embedding"],
        "active_non_embedding": total - inactive - parts["embedding"],
        "mtp": mtp,
    }


def human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.model.params", description="parameter counts of a config")
    _, cfg = config_from_cli(parser, argv)
    counts = count_params(cfg.model)
    print(
        f"{cfg.name}: {cfg.model.num_layers} layers ({cfg.model.num_dense_layers} dense, "
        f"{cfg.model.num_moe_layers} MoE), d_model {cfg.model.d_model}, {cfg.model.attention.kind} attention"
    )
    for key in (*PARTS, "total", "active", "non_embedding", "active_non_embedding", "mtp"):
        print(f"  {key:<22}{counts[key]:>18,}  {human(counts[key]):>9}")
    print(json.dumps({"config": cfg.name, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
