"""Scaling-law experiments: ``python -m moela.scaling {plan,run,fit,plot} ...``.

    python -m moela.scaling plan --budgets 1e15,3e15,1e16 --family moe --out DIR [...]
    python -m moela.scaling run DIR/manifest.json [--shard i/n] [--results DIR/results.jsonl]
    python -m moela.scaling fit DIR/results.jsonl [--target 1e21] [--bootstrap 100] [--out fit.json]
    python -m moela.scaling plot DIR/results.jsonl [--fit fit.json] --out DIR/plots [--target 1e21]

Every subcommand prints a human summary and, as its last line of stdout, one JSON object. A
mistake in the arguments, the family, the manifest or the results is one ``error:`` line on
stderr and exit status 2. The convention throughout is C = 6·N·D with N = flops_per_token / 6
(``scaling.flops``): see ``scaling.plan``, ``scaling.run`` and ``scaling.fit``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from moela.configs.loader import ConfigError
from moela.scaling.family import FamilyError
from moela.model.flops import SCALING_CONVENTION
from moela.scaling.plan import PlanError
from moela.scaling.run import RunError


def cmd_plan(args) -> dict:
    from moela.scaling.plan import make_plan

    return make_plan(args)


def cmd_run(args) -> dict:
    from moela.scaling.run import run_sweep

    return run_sweep(args.manifest, args.shard, args.results, log=functools.partial(print, flush=True))


def good_rows(path: str | Path) -> tuple[list[dict], int]:
    """``fit.load_rows`` on the finished runs only: failed rows (an ``error``, no loss) and all but
    the latest row of a run are dropped first. Returns (rows, number dropped)."""
    from moela.scaling import fit
    from moela.scaling.run import finished, read_rows

    path = Path(path)
    if path.suffix != ".jsonl":
        return fit.load_rows(path), 0
    if not path.is_file():
        raise RunError(f"results file '{path}' not found")
    rows = read_rows(path)
    latest = {r.get("name", i): r for i, r in enumerate(rows) if finished(r)}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / path.name
        clean.write_text("".join(json.dumps(r) + "\n" for r in latest.values()))
        return fit.load_rows(clean), len(rows) - len(latest)


def _jsonable(x):
    """Fit results hold numpy scalars/arrays and NaN: make them plain JSON (NaN -> null)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fit_all(rows: list[dict], target: float, bootstrap: int = 0) -> dict:
    """Approach 2 and 3 on ``rows`` and both compute-optimal predictions at ``target``; a failing
    approach is reported under ``error`` rather than stopping the other."""
    from moela.scaling import fit

    out = {"convention": SCALING_CONVENTION, "fit_convention": fit.CONVENTION, "target": target, "runs": len(rows)}
    # a weak fit overflows and divides by zero on its way; what matters is said by ``assess``
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            out["approach2"] = fit.approach2(rows)
            out["approach2_optimal"] = fit.power_law_optimal(out["approach2"], target)
        except ValueError as e:
            out["approach2_error"] = str(e)
        try:
            out["approach3"] = fit.approach3(rows, bootstrap=bootstrap, seed=0, target_c=target)
            out["approach3_optimal"] = fit.compute_optimal(out["approach3"], target)
        except ValueError as e:
            out["approach3_error"] = str(e)
    out["warnings"] = fit.assess(out.get("approach2"), out.get("approach3"))
    out["trustworthy"] = not out["warnings"]
    return _jsonable(out)


def format_fit(result: dict) -> str:
    lines = []
    if "approach2" in result:
        f2 = result["approach2"]
        skipped = f"; skipped {len(f2['skipped'])} budget(s)" if f2["skipped"] else ""
        lines.append(
            f"Approach 2 (IsoFLOP parabolas, {len(f2['per_budget'])} budgets): "
            f"N_opt = {_g(f2['k_n'])}*C^{_g(f2['a'], '.3f')}, D_opt = {_g(f2['k_d'])}*C^{_g(f2['b'], '.3f')}{skipped}"
        )
    else:
        lines.append(f"Approach 2: not fitted: {result['approach2_error']}")
    if "approach3" in result:
        f3 = result["approach3"]
        lines.append(
            f"Approach 3 (parametric): L = {_g(f3['E'], '.3f')} + {_g(f3['A'], '.4g')}/N^{_g(f3['alpha'], '.3f')} + "
            f"{_g(f3['B'], '.4g')}/D^{_g(f3['beta'], '.3f')}"
        )
    else:
        lines.append(f"Approach 3: not fitted: {result['approach3_error']}")
    lines.append(f"compute-optimal at C = {result['target']:.3g} FLOPs ({SCALING_CONVENTION}):")
    for name in ("approach2", "approach3"):
        o = result.get(f"{name}_optimal")
        if o:
            loss = f", loss {o['loss']:.4f}" if o.get("loss") is not None else ""
            lines.append(
                f"  {name}: N = {_g(o['N'])}, D = {_g(o['D'])}, tokens/param = {_g(o['tokens_per_param'])}{loss}"
            )
    return "\n".join(lines)


def cmd_fit(args) -> dict:
    rows, dropped = good_rows(args.results)
    target = args.target or 10 * max(r.get("budget", r["C"]) for r in rows)
    result = fit_all(rows, target, args.bootstrap)
    left_out = f" ({dropped} failed or superseded rows left out)" if dropped else ""
    print(f"{len(rows)} runs from {args.results}{left_out}")
    print(format_fit(result))
    if result["warnings"]:
        print(f"warning: this fit is not trustworthy: {'; '.join(result['warnings'])}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    if "approach2" not in result and "approach3" not in result:
        raise RunError("neither approach could be fitted (see above)")
    params = {k: result["approach3"][k] for k in ("E", "A", "B", "alpha", "beta")} if "approach3" in result else None
    summary = {k: v for k, v in result.items() if k not in ("approach2", "approach3")}
    return {**summary, "approach3_params": params, "out": args.out}


def _g(x, spec: str = ".3g") -> str:
    """A number as ``spec``; n/a for what the fit's JSON form holds as null (missing, or not finite)."""
    return "n/a" if x is None else format(x, spec)


def _numbers(fit: dict | None) -> dict | None:
    """A fit read back from JSON, where a non-finite parameter was written as null: NaN again."""
    if fit is None:
        return None
    return {
        k: math.nan if v is None and k in ("E", "A", "B", "alpha", "beta", "a", "b", "k_n", "k_d") else v
        for k, v in fit.items()
    }


def cmd_plot(args) -> dict:
    from moela.scaling import plot

    rows, _ = good_rows(args.results)
    if args.fit:
        try:
            saved = json.loads(Path(args.fit).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"cannot read fit file '{args.fit}': {e}") from None
    else:
        saved = fit_all(rows, args.target or 10 * max(r.get("budget", r["C"]) for r in rows))
    target = args.target or saved.get("target")
    fit2, fit3 = (_numbers(saved.get(k)) for k in ("approach2", "approach3"))
    paths, left_out = plot.plot_all(rows, fit2, fit3, args.out, target_budget=target)
    for p in paths:
        print(f"wrote {p}")
    for name, why in left_out.items():
        print(f"left out {name}: {why}", file=sys.stderr)
    return {"plots": [str(p) for p in paths], "left_out": left_out, "out": str(args.out), "runs": len(rows)}


def build_parser() -> argparse.ArgumentParser:
    from moela.scaling.plan import add_arguments

    parser = argparse.ArgumentParser(prog="python -m moela.scaling", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write an IsoFLOP grid of run configs and a manifest")
    add_arguments(p)
    p.set_defaults(func=cmd_plan)
    r = sub.add_parser("run", help="train a manifest's runs, appending result rows")
    r.add_argument("manifest", help="plan directory, manifest.json or manifest.jsonl")
    r.add_argument("--shard", help="i/n: only the runs whose index is i mod n")
    r.add_argument("--results", help="results JSONL (default: results.jsonl in the plan directory)")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fit", help="fit Approaches 2 and 3 to result rows")
    f.add_argument("results", help="results .jsonl or .csv")
    f.add_argument("--target", type=float, help="compute budget to predict at (default: 10x the largest budget)")
    f.add_argument("--bootstrap", type=int, default=0, help="Approach 3 bootstrap resamples for intervals")
    f.add_argument("--out", help="write the fit as JSON here")
    f.set_defaults(func=cmd_fit)
    g = sub.add_parser("plot", help="plot result rows and fits as PNGs")
    g.add_argument("results", help="results .jsonl or .csv")
    g.add_argument("--fit", help="fit.json from 'fit' (default: fit here, without bootstrap)")
    g.add_argument("--out", required=True, help="directory for the PNGs")
    g.add_argument("--target", type=float, help="extend the optimal-N/D plot to this budget")
    g.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (PlanError, FamilyError, RunError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, **result}))
    failed = result.get("failed") if args.command == "run" else None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
