"""Model families for scaling-law sweeps: a base config plus a rule from a target N to a shape.

A family file (``<name>``) defines ``get_family() -> Family``. The
:class:`Family` holds the base :class:`~configs.schema.Config` every run starts from (data,
train defaults, attention kind, mesh) and a rule ``model_for(target_n) -> ModelConfig``. N is
always the 6·N·D convention of ``scaling.flops``: ``flops_per_token / 6`` at the family's
``train.seq_len`` (active parameters, LM head and attention scores included), so a run of D
tokens costs exactly C = 6·N·D.

:class:`ShapeRule` is the usual rule. Candidate shapes are (n_layers, d_model) with d_model on a
grid of round widths (multiples of ``width_multiple``; above 8 multiples at most 8 widths per
octave) and an aspect ratio d_model / n_layers within a factor ``aspect_band`` of ``aspect``
(e.g. d_model ≈ 64·n_layers). ``build(base_model, n_layers, d_model)`` resizes the family's
base ModelConfig to a shape, keeping its vocab, attention kind, expert count and top-k: heads =
d_model / head_dim, MLA ranks and MLP widths proportional to d_model, MoE experts' d_ff scaling
with d_model at a fixed E and top-k. For a target, among the candidates whose N is
within ``tolerance`` of it (relative) the one closest to the aspect ratio wins; if there is none,
the one with the nearest N. Either way the realised N is monotone in the target.

A candidate's N is exact and cheap: at a fixed width every layer of a kind is identical, so
flops per token is affine in n_layers, and two abstract parameter counts per width (cached)
give every depth. ``tests/test_scaling_plan.py`` checks this against a direct count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moela.configs.loader import call_file, find_file
from moela.configs.schema import AttentionConfig, Config, ModelConfig
from moela.model.flops import flops_per_token


class FamilyError(ValueError):
    """A family file or a target it cannot serve; the message names it and what would be valid."""


def round_up(x: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(x / multiple - 1e-9)) * multiple)


def mla_attention(d_model: int, head_dim: int = 64, max_kv_rank: int = 512) -> AttentionConfig:
    """MLA scaled from d_model, in DeepSeek-V2/V3's proportions: heads of ``head_dim`` (nope) +
    head_dim/2 (rope), values of head_dim, latent rank d_model/4 (at most 512), a query
    latent (3x the KV rank) only from d_model 4096 up (V2-Lite has none, V2/V3 do)."""
    kv_rank = min(max_kv_rank, round_up(d_model / 4, 16))
    return AttentionConfig(
        kind="mla",
        num_heads=d_model // head_dim,
        q_lora_rank=3 * kv_rank if d_model >= 4096 else 0,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim,
    )


def gqa_attention(d_model: int, head_dim: int = 64, kv_groups: int = 4) -> AttentionConfig:
    """Grouped-query attention: d_model/head_dim query heads sharing KV in groups of ``kv_groups``."""
    heads = d_model // head_dim
    kv = max(1, heads // kv_groups)
    while heads % kv:
        kv -= 1
    return AttentionConfig(kind="gqa", num_heads=heads, num_kv_heads=kv, head_dim=head_dim)


@dataclass(frozen=True)
class ShapeRule:
    """How a family's shape grows; see the module docstring. ``build(base_model, n_layers,
    d_model)`` returns the base model resized (vocab, kinds, expert counts stay the base's)."""

    build: Callable[[ModelConfig, int, int], ModelConfig]
    width_multiple: int = 64
    aspect: float = 64.0  # d_model / n_layers aimed at
    aspect_band: float = 2.0  # allowed: aspect / band .. aspect * band
    min_layers: int = 1  # also the first depth whose layers are all alike (MoE: first_k_dense + 1)
    max_layers: int = 128
    min_width: int = 64
    max_width: int = 16384
    tolerance: float = 0.1  # relative N error accepted in exchange for a better aspect ratio

    def widths(self) -> list[int]:
        m, out, step = self.width_multiple, [], self.width_multiple
        d = round_up(self.min_width, m)
        while d <= self.max_width:
            if len(self.layer_range(d)):
                out.append(d)
            if d >= 16 * step:  # above 16 multiples: at most 8 widths per octave
                step *= 2
            d = round_up(d + step, step)
        if not out:
            raise FamilyError("the shape rule allows no (n_layers, d_model) at all; check its width and layer bounds")
        return out

    def layer_range(self, d_model: int) -> range:
        lo = max(self.min_layers, math.ceil(d_model / (self.aspect * self.aspect_band) - 1e-9))
        hi = min(self.max_layers, math.floor(d_model * self.aspect_band / self.aspect + 1e-9))
        return range(lo, hi + 1)


@dataclass(frozen=True)
class Sizer:
    """A shape rule applied to one base model at one sequence length: target N -> shape."""

    rule: ShapeRule
    base: ModelConfig
    seq_len: int

    def build(self, n_layers: int, d_model: int) -> ModelConfig:
        return self.rule.build(self.base, n_layers, d_model)

    def n_of(self, n_layers: int, d_model: int) -> float:
        """N (flops per token / 6) of the shape, from the cached affine law of its width."""
        a, b = _affine(self, d_model)
        return (a + b * (n_layers - self.rule.min_layers)) / 6

    def n_range(self) -> tuple[float, float]:
        widths, layers = self.rule.widths(), self.rule.layer_range
        return self.n_of(layers(widths[0])[0], widths[0]), self.n_of(layers(widths[-1])[-1], widths[-1])

    def shape_for(self, target_n: float) -> tuple[int, int]:
        if not target_n > 0:
            raise FamilyError(f"target N must be > 0, got {target_n}")
        r, widths = self.rule, self.rule.widths()
        lo_n, hi_n = self.n_range()
        if not lo_n / (1 + r.tolerance) <= target_n <= hi_n * (1 + r.tolerance):
            raise FamilyError(
                f"target N {target_n:.3g} is outside this family's range [{lo_n:.3g}, {hi_n:.3g}] "
                "(6ND convention); change the budgets or --span, or widen the family's shape rule"
            )
        # the widths whose depth band can reach the target: a contiguous run (N grows with width and depth)
        first = _bisect(widths, lambda d: self.n_of(r.layer_range(d)[-1], d) >= target_n / (1 + r.tolerance))
        last = _bisect(widths, lambda d: self.n_of(r.layer_range(d)[0], d) > target_n * (1 + r.tolerance))
        shapes = [(n, d) for d in widths[max(0, first - 1) : last + 1] for n in r.layer_range(d)]
        err = {s: abs(math.log(self.n_of(*s) / target_n)) for s in shapes}
        close = [s for s in shapes if err[s] <= math.log1p(r.tolerance)]
        if close:
            return min(close, key=lambda s: (abs(math.log(s[1] / s[0] / r.aspect)), err[s], s))
        return min(shapes, key=lambda s: (err[s], s))

    def model_for(self, target_n: float) -> ModelConfig:
        return self.build(*self.shape_for(target_n))


def _bisect(items: list, pred) -> int:
    """Index of the first item where the monotone ``pred`` holds (len(items) if none)."""
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(items[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


@functools.lru_cache(maxsize=4096)
def _affine(sizer: Sizer, d_model: int) -> tuple[int, int]:
    """(flops at min_layers, flops added per layer) at this width: exact, layers of a kind being alike."""
    n = sizer.rule.min_layers
    base = flops_per_token(sizer.build(n, d_model), sizer.seq_len)
    return base, flops_per_token(sizer.build(n + 1, d_model), sizer.seq_len) - base


@dataclass(frozen=True)
class Family:
    """A base config, a shape rule, and how a plan turns (N, C) into training settings.

    Batch and learning rate come from the plan's rule (DeepSeek LLM's by default) clamped to
    ``batch_bounds`` (sequences) and ``lr_bounds``. Evaluation reads the first validation rows:
    exactly ``eval_rows`` of them in every run when set (batch sizes are then divisors of it), else
    about ``eval_tokens`` tokens; it runs ``evals_per_run`` times and at the end. Warmup is
    ``warmup_fraction`` of the steps, at most ``max_warmup``.
    """

    name: str
    base: Config
    rule: ShapeRule
    description: str = ""
    data_parallel: int = 1  # the batch is rounded to a multiple of this many sequences
    batch_bounds: tuple[int, int] = (1, 65536)
    lr_bounds: tuple[float, float] = (1e-5, 1e-2)
    eval_tokens: int = 1 << 20
    eval_rows: int = 0
    evals_per_run: int = 4
    checkpoints_per_run: int = 4
    warmup_fraction: float = 0.05
    max_warmup: int = 2000

    @property
    def seq_len(self) -> int:
        return self.base.train.seq_len

    @property
    def sizer(self) -> Sizer:
        return Sizer(self.rule, self.base.model, self.seq_len)

    def model_for(self, target_n: float) -> ModelConfig:
        return self.sizer.model_for(target_n)

    def n_of(self, model: ModelConfig) -> float:
        return flops_per_token(model, self.seq_len) / 6


FAMILIES = Path(__file__).parent / "families"


def load_family(path: str | Path) -> Family:
    """Import a family file (or a bare family name: ``moela/scaling/families/<name>.py``) and call its
    ``get_family()``; every mistake is a FamilyError."""
    p = find_file(path, FAMILIES, "family", FamilyError)
    return call_file(
        p,
        "get_family",
        Family,
        FamilyError,
        label=str(path),
        kind="family file",
        module_prefix="moela_family",
        returns="moela.scaling.family.Family",
    )
