"""IsoFLOP grids: for each budget C, 5-9 model sizes of a family, each trained on D = C / flops_per_token.

    python -m moela.scaling plan --budgets 1e15,3e15,1e16 --family moe --out DIR \\
        [--sizes 7] [--span 1.0] [--tokens-per-param 20] [--batch-rule deepseek|fixed] \\
        [--lr-rule deepseek|fixed] [--dp 1] [--set key=value ...] [--force]

Conventions. N is ``scaling.flops``' 6ND N (flops_per_token / 6 at the family's seq_len: active
parameters, LM head and attention scores included) and C = 6·N·D exactly, D = steps·batch·seq
being the tokens a run trains on (steps rounded to an integer, so C is the budget within half a
step). Per budget the target sizes are ``sizes`` points evenly spaced in log N over ``span``
decades centred on N0 = sqrt(C / (6·tokens_per_param)) (20 tokens per parameter by default), or
on an Approach-3 fit's optimum (``--fit fit.json``); a window that leaves the family's range is
shifted into it. Each target becomes the family's nearest shape (``scaling.family``); two targets
on one shape are an error (the family is too coarse there: fewer sizes or a wider span).

Batch and learning rate (``--batch-rule``/``--lr-rule deepseek``, the default) follow DeepSeek LLM
(arXiv:2401.02954, sec. 3.1) at the budget C: B_opt = 0.2920·C^0.3271 tokens and
η_opt = 0.3118·C^-0.1250, clamped to the family's bounds; the batch is rounded to a multiple of
the data-parallel size (``--dp``, default the family's) and shrunk, down to its lower bound, so a
run has at least ``MIN_STEPS`` steps. ``fixed`` takes the base config's values. Warmup is the
family's fraction of the steps (capped), evaluation and checkpoints come a fixed number of times
per run, and every run evaluates the same first ``eval_rows`` validation rows (batches then divide
it), or about ``eval_tokens`` tokens when a family sets no ``eval_rows``.

Output: ``DIR/configs/<name>.json`` (a full config, ``configs.loader.load_json``) and beside it
``<name>.py`` (a preset for ``train.py --config`` that loads the JSON), ``DIR/manifest.json``
(the plan's inputs and runs) and ``DIR/manifest.jsonl`` (one run a line). Run names are
``iso-C<C>-N<N>`` with C to 1 and the realised N to 3 significant digits, no '+' (``iso-C1e15-N2.31e07``),
so re-planning gives the same names. Paths are absolute: a plan directory is not relocatable.
Planning into a directory that holds the same plan changes nothing; a different plan is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from moela.configs.loader import apply_overrides, check_types, save_json
from moela.configs.validate import validate
from moela.scaling.family import Family, load_family
from moela.model.flops import SCALING_CONVENTION, param_summary

DEEPSEEK_BATCH = (0.2920, 0.3271)  # B_opt = k·C^e tokens
DEEPSEEK_LR = (0.3118, -0.1250)  # η_opt = k·C^e
MIN_STEPS = 20
SIZES_RANGE = (5, 9)
DEFAULT_SIZES = 7
PLAN_FORMAT = 1


class PlanError(ValueError):
    """A plan that cannot be made or written; the message says what would be valid."""


class TooCoarse(PlanError):
    """Two target sizes of one budget map to the same model shape."""


def deepseek_batch_tokens(c: float) -> float:
    return DEEPSEEK_BATCH[0] * c ** DEEPSEEK_BATCH[1]


def deepseek_lr(c: float) -> float:
    return DEEPSEEK_LR[0] * c ** DEEPSEEK_LR[1]


def run_name(budget: float, n: float) -> str:
    """``iso-C1e15-N2.31e07``: deterministic, file-name safe (no '+')."""
    return f"iso-C{budget:.0e}-N{n:.2e}".replace("e+", "e")


def target_sizes(budget: float, sizes: int, span: float, center: float) -> list[float]:
    """``sizes`` N values evenly spaced in log10 over ``span`` decades centred on ``center``."""
    return [center * 10 ** (span * (i / (sizes - 1) - 0.5)) for i in range(sizes)]


def batch_sequences(budget: float, tokens: float, family: Family, rule: str, dp: int) -> int:
    """Global batch in sequences: the rule's, clamped, a multiple of ``dp``, >= MIN_STEPS steps if it can;
    with ``family.eval_rows`` a divisor of it (so every run evaluates exactly those rows)."""
    seq = family.seq_len
    lo, hi = family.batch_bounds
    want = family.base.train.global_batch_size if rule == "fixed" else deepseek_batch_tokens(budget) / seq
    if rule != "fixed":
        want = min(max(min(want, tokens / (MIN_STEPS * seq)), lo), hi)  # keep enough optimiser steps
    if not family.eval_rows:
        return max(dp, int(round(want / dp)) * dp)
    choices = [b for b in range(dp, family.eval_rows + 1, dp) if family.eval_rows % b == 0 and lo <= b <= hi]
    if not choices:
        raise PlanError(
            f"no batch size between {lo} and {hi} sequences is a multiple of --dp {dp} and divides the "
            f"family's eval_rows {family.eval_rows}"
        )
    return min(choices, key=lambda b: (abs(math.log(b / want)), b))


def learning_rate(budget: float, family: Family, rule: str) -> float:
    if rule == "fixed":
        return family.base.train.learning_rate
    lo, hi = family.lr_bounds
    return float(f"{min(max(deepseek_lr(budget), lo), hi):.4g}")


def _centers(budgets: list[float], tokens_per_param: float, fit: dict | None) -> list[float]:
    if fit is None:
        return [math.sqrt(c / (6 * tokens_per_param)) for c in budgets]
    from moela.scaling.fit import compute_optimal

    fit3 = fit.get("approach3", fit)
    return [compute_optimal(fit3, c)["N"] for c in budgets]


def _shift_into(targets: list[float], lo: float, hi: float, budget: float) -> list[float]:
    if targets[-1] / targets[0] > hi / lo:
        raise PlanError(
            f"budget {budget:.3g}: the size window {targets[0]:.3g}..{targets[-1]:.3g} is wider than "
            f"the family's range {lo:.3g}..{hi:.3g}; lower --span"
        )
    factor = max(1.0, lo / targets[0]) * min(1.0, hi / targets[-1])
    return [t * factor for t in targets]


def plan_runs(
    family: Family,
    budgets: list[float],
    out: Path,
    sizes: int = 7,
    span: float = 1.0,
    tokens_per_param: float = 20.0,
    batch_rule: str = "deepseek",
    lr_rule: str = "deepseek",
    dp: int | None = None,
    fit: dict | None = None,
) -> list[dict]:
    """The grid as run dicts in budget-then-size order (manifest fields, plus the ``Config`` under ``_cfg``)."""
    dp = dp or family.data_parallel
    lo, hi = family.sizer.n_range()
    runs = []
    for budget, center in zip(budgets, _centers(budgets, tokens_per_param, fit)):
        targets = _shift_into(target_sizes(budget, sizes, span, center), lo, hi, budget)
        shapes: dict[tuple, float] = {}
        for target in targets:
            model = family.model_for(target)
            shape = (model.num_layers, model.d_model)
            if shape in shapes:
                raise TooCoarse(
                    f"budget {budget:.3g}: targets N={shapes[shape]:.3g} and {target:.3g} both give "
                    f"{shape[0]} layers x d_model {shape[1]}; the family is too coarse here: lower "
                    "--sizes or raise --span"
                )
            shapes[shape] = target
            runs.append(_run(family, budget, target, model, out, batch_rule, lr_rule, dp))
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise PlanError(
            f"two runs share a name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
            "budgets must differ at 1 significant digit"
        )
    return runs


def _run(
    family: Family, budget: float, target: float, model, out: Path, batch_rule: str, lr_rule: str, dp: int
) -> dict:
    base, seq = family.base, family.seq_len
    summary = param_summary(model, seq)
    fpt = summary["flops_per_token"]
    n = fpt / 6
    name = run_name(budget, n)
    batch = batch_sequences(budget, budget / fpt, family, batch_rule, dp)
    steps = max(1, round(budget / fpt / (batch * seq)))
    tokens = steps * batch * seq
    warmup = max(1, min(family.max_warmup, round(family.warmup_fraction * steps), steps - 1))
    run_dir = out / "runs" / name
    train = dataclasses.replace(
        base.train,
        steps=steps,
        global_batch_size=batch,
        learning_rate=learning_rate(budget, family, lr_rule),
        warmup_steps=warmup,
        eval_every=math.ceil(steps / family.evals_per_run),
        eval_batches=math.ceil((family.eval_rows or family.eval_tokens / seq) / batch),
        checkpoint_every=math.ceil(steps / family.checkpoints_per_run),
        log_every=max(1, steps // 50),
        out_dir=str(run_dir),
    )
    cfg = dataclasses.replace(base, name=name, model=model, train=train)
    check_types(cfg)
    validate(cfg)
    return {
        "name": name,
        "budget": budget,
        "target_n": float(f"{target:.6g}"),
        "N": n,
        "D": tokens,
        "C": fpt * tokens,
        "tokens_per_param": tokens / n,
        "n_total": summary["total"],
        "n_active": summary["active"],
        "n_non_embedding": summary["non_embedding"],
        "flops_per_token": fpt,
        "layers": model.num_layers,
        "d_model": model.d_model,
        "seq_len": seq,
        "batch": batch,
        "steps": steps,
        "lr": train.learning_rate,
        "warmup": warmup,
        "config": str(out / "configs" / f"{name}.json"),
        "preset": str(out / "configs" / f"{name}.py"),
        "run_dir": str(run_dir),
        "_cfg": cfg,
    }


PRESET = '''"""Generated by ``python -m moela.scaling plan``: run {name} of family {family}.
Edit the JSON, not this file."""

from pathlib import Path

from moela.configs.loader import load_json


def get_config():
    return load_json(Path(__file__).with_suffix(".json"))
'''


def write_plan(runs: list[dict], meta: dict, out: Path) -> bool:
    """Write configs and manifests; True if the directory already held this plan (nothing changed)."""
    manifest = {"format": PLAN_FORMAT, "meta": meta, "runs": [_public(r) for r in runs]}
    path = out / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"'{path}' exists but is unreadable ({e}); choose another --out") from None
        if old != json.loads(json.dumps(manifest)):
            raise PlanError(
                f"'{out}' already holds a different plan ({_first_difference(old, manifest)}); "
                "choose another --out, or delete the old plan"
            )
        _write_configs(runs, meta, only_missing=True)
        return True
    if out.exists() and any(out.iterdir()):
        raise PlanError(f"'{out}' is not empty and holds no plan (manifest.json); choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_configs(runs, meta)
    (out / "manifest.jsonl").write_text("".join(json.dumps(_public(r)) + "\n" for r in runs))
    path.write_text(json.dumps(manifest, indent=1) + "\n")  # last: its presence marks a complete plan
    return False


def _write_configs(runs: list[dict], meta: dict, only_missing: bool = False) -> None:
    for r in runs:
        Path(r["config"]).parent.mkdir(parents=True, exist_ok=True)
        if not (only_missing and Path(r["config"]).is_file()):
            save_json(r["_cfg"], r["config"])
        if not (only_missing and Path(r["preset"]).is_file()):
            Path(r["preset"]).write_text(PRESET.format(name=r["name"], family=meta["family"]))


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def _first_difference(old: dict, new: dict) -> str:
    new = json.loads(json.dumps(new))
    for key in ("format", "meta"):
        if old.get(key) != new.get(key):
            if isinstance(new.get(key), dict) and isinstance(old.get(key), dict):
                diff = sorted(k for k in new[key].keys() | old[key].keys() if old[key].get(k) != new[key].get(k))
                return f"{key} differs in {', '.join(diff)}"
            return f"{key} differs"
    old_names, new_names = [r.get("name") for r in old.get("runs", [])], [r["name"] for r in new["runs"]]
    if old_names != new_names:
        return f"runs differ: {len(old_names)} planned there, {len(new_names)} now"
    return "run settings differ"


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--budgets {text!r} must be comma-separated numbers, e.g. 1e15,3e15,1e16") from None
    if not budgets or any(not (math.isfinite(b) and b > 0) for b in budgets):
        raise PlanError(f"--budgets {text!r}: every budget must be a finite number of FLOPs > 0")
    if len(set(budgets)) != len(budgets):
        raise PlanError(f"--budgets {text!r} repeats a budget")
    return sorted(budgets)


def make_plan(args) -> dict:
    """``python -m moela.scaling plan``: validate the arguments, plan, write, print; returns the JSON summary."""
    budgets = parse_budgets(args.budgets)
    lo, hi = SIZES_RANGE
    if args.sizes is not None and not (lo <= args.sizes <= hi or (args.force and args.sizes >= 2)):
        raise PlanError(
            f"--sizes {args.sizes} must be between {lo} and {hi} (IsoFLOP parabolas need a few points "
            "either side of the minimum); --force allows any >= 2"
        )
    if not (args.span > 0 and args.tokens_per_param > 0 and (args.dp is None or args.dp > 0)):
        raise PlanError("--span, --tokens-per-param and --dp must be > 0")
    family = load_family(args.family)
    base = apply_overrides(family.base, args.overrides)
    check_types(base)
    family = dataclasses.replace(family, base=validate(base))
    fit = json.loads(Path(args.fit).read_text()) if args.fit else None
    out = Path(args.out).resolve()
    plan = functools.partial(
        plan_runs,
        family,
        budgets,
        out,
        span=args.span,
        tokens_per_param=args.tokens_per_param,
        batch_rule=args.batch_rule,
        lr_rule=args.lr_rule,
        dp=args.dp,
        fit=fit,
    )
    sizes = args.sizes
    if sizes is not None:
        runs = plan(sizes)
    else:  # as many sizes as the family can tell apart at every budget, from DEFAULT_SIZES down to the minimum
        for sizes in range(DEFAULT_SIZES, lo - 1, -1):
            try:
                runs = plan(sizes)
                break
            except TooCoarse as e:
                coarse = e
        else:
            raise PlanError(f"{coarse}; even {lo} sizes per budget are too many here") from None
        if sizes < DEFAULT_SIZES:
            print(
                f"{sizes} sizes per budget: the family has too few distinct shapes for {DEFAULT_SIZES} at these budgets"
            )
    meta = {
        "family": str(Path(args.family).resolve()),
        "family_name": family.name,
        "budgets": budgets,
        "sizes": sizes,
        "span": args.span,
        "tokens_per_param": args.tokens_per_param,
        "fit": str(Path(args.fit).resolve()) if args.fit else None,
        "batch_rule": args.batch_rule,
        "lr_rule": args.lr_rule,
        "dp": args.dp or family.data_parallel,
        "overrides": list(args.overrides),
        "seq_len": family.seq_len,
        "convention": SCALING_CONVENTION,
    }
    unchanged = write_plan(runs, meta, out)
    print(format_table(runs))
    print(
        f"{'unchanged: ' if unchanged else ''}{len(runs)} runs of family {family.name} in {out} "
        f"(total {sum(r['C'] for r in runs):.3g} FLOPs; {SCALING_CONVENTION})"
    )
    return {
        "out": str(out),
        "manifest": str(out / "manifest.json"),
        "runs": len(runs),
        "budgets": budgets,
        "family": family.name,
        "unchanged": unchanged,
        "total_flops": sum(r["C"] for r in runs),
        "convention": SCALING_CONVENTION,
    }


def format_table(runs: list[dict]) -> str:
    head = f"{'name':<24}{'C':>10}{'N':>10}{'shape':>10}{'D':>10}{'D/N':>7}{'steps':>7}{'batch':>6}{'lr':>9}"
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r['name']:<24}{r['C']:>10.3g}{r['N']:>10.3g}{r['layers']:>4}x{r['d_model']:<5}"
            f"{r['D']:>10.3g}{r['tokens_per_param']:>7.1f}{r['steps']:>7}{r['batch']:>6}{r['lr']:>9.2e}"
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--budgets", required=True, help="comma-separated FLOP budgets, e.g. 1e15,3e15,1e16")
    parser.add_argument("--family", required=True, help="family file, e.g. moe")
    parser.add_argument("--out", required=True, help="plan directory (configs/, runs/, manifest.json)")
    parser.add_argument(
        "--sizes",
        type=int,
        default=None,
        help=f"model sizes per budget (5..9; default: {DEFAULT_SIZES}, or fewer where the family has too few shapes)",
    )
    parser.add_argument("--span", type=float, default=1.0, help="decades of N covered per budget")
    parser.add_argument("--tokens-per-param", type=float, default=20.0, help="centre of the window: D/N")
    parser.add_argument("--fit", help="centre the window on this fit's Approach-3 optimum instead (fit.json)")
    parser.add_argument("--batch-rule", choices=("deepseek", "fixed"), default="deepseek")
    parser.add_argument("--lr-rule", choices=("deepseek", "fixed"), default="deepseek")
    parser.add_argument("--dp", type=int, help="data-parallel size the batch must divide (default: the family's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base-config field for every run, e.g. --set data.text_glob=... (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="allow --sizes outside 5..9")
