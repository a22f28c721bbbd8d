"""Compute-optimal scaling laws fitted to finished training runs (Chinchilla Approaches 2 and 3).

Convention (named in every output as ``CONVENTION``): a run is a row with training FLOPs C,
parameters N and tokens D where C = 6·N·D holds exactly (N is the 6ND-convention parameter
count, see ``scaling.flops``), and loss is the final eval loss in nats/token. Runs of one
IsoFLOP curve share the row's ``budget`` (the planned C); rows without one are grouped by C
rounded to 2 significant digits.

Approach 2 (Hoffmann et al. 2022, §3.2): per budget, a parabola of loss in log10 N; its vertex
is N_opt(C) and D_opt = C/(6·N_opt); then N_opt = k_n·C^a and D_opt = k_d·C^b by least squares
in log space. Since D_opt = C/(6·N_opt) per budget, b = 1 − a and k_d = 1/(6·k_n) exactly.

Approach 3 as Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") fit it:
L(N, D) = E + A/N^α + B/D^β, parameterised by θ = (a, b, e, α, β) with A = e^a, B = e^b,
E = e^e (natural logs), log L̂ = LSE(a − α·log N, b − β·log D, e), and the objective
Σ_runs Huber_δ(log L̂ − log L), δ = 1e-3, minimised by L-BFGS-B (analytic gradient) from a grid
of starts, keeping the best. Minimising L subject to C = 6·N·D then has the closed form
N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β))/G, G = (α·A/(β·B))^(1/(α+β)).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

CONVENTION = "C = 6*N*D (N: 6ND-convention params, D: tokens), loss in nats/token"
REQUIRED = ("C", "N", "D", "loss")
PARAMS = ("a", "b", "e", "alpha", "beta")  # the order of θ in every array below

# Hoffmann et al.'s initialisation grid (Appendix D.2): 5·5·5·6·6 = 4500 starts.
HOFFMANN_GRID = {
    "alpha": np.arange(0, 2.01, 0.5),
    "beta": np.arange(0, 2.01, 0.5),
    "e": np.arange(-1, 1.01, 0.5),
    "a": np.arange(0, 25.1, 5),
    "b": np.arange(0, 25.1, 5),
}
DEFAULT_STARTS = 16  # L-BFGS-B runs from the grid points with the lowest objective


# --------------------------------------------------------------------------- rows


def group_key(row: dict) -> float:
    """The IsoFLOP curve a run belongs to: its ``budget``, else C to 2 significant digits."""
    if row.get("budget") is not None:
        return float(row["budget"])
    return float(f"{float(row['C']):.1e}")


def load_rows(path: str | Path) -> list[dict]:
    """Result rows from ``.jsonl`` (one object a line) or ``.csv`` (header row; numeric fields
    become floats). Raises ValueError naming the file, the line and the column when C, N, D or
    loss is missing, non-finite or ≤ 0, or when C = 6·N·D is off by more than 1%."""
    path = Path(path)
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        rows = [(i + 1, json.loads(line)) for i, line in enumerate(lines) if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [
                (i + 2, {k: v if k == "name" else _maybe_float(v) for k, v in r.items()})
                for i, r in enumerate(csv.DictReader(f))
            ]
    else:
        raise ValueError(f"{path}: expected a .jsonl or .csv file of result rows")
    if not rows:
        raise ValueError(f"{path}: no result rows")
    for line, row in rows:
        if row.get("budget") in (None, ""):
            row.pop("budget", None)  # grouped by C instead
        for col in REQUIRED + (("budget",) if "budget" in row else ()):
            value = row.get(col)
            if value is None or value == "":
                raise ValueError(f"{path}, line {line}: missing column {col!r} (need {', '.join(REQUIRED)})")
            try:
                row[col] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: column {col!r} is not a number: {value!r}") from None
            if not math.isfinite(row[col]) or row[col] <= 0:
                raise ValueError(f"{path}, line {line}: column {col!r} must be finite and > 0, got {value!r}")
        if abs(6 * row["N"] * row["D"] / row["C"] - 1) > 1e-2:
            raise ValueError(
                f"{path}, line {line}: C={row['C']:.4g} but 6*N*D={6 * row['N'] * row['D']:.4g}; "
                f"rows must use the C = 6*N*D convention"
            )
        row.setdefault("name", f"{path.stem}:{line}")
    return [row for _, row in rows]


def _maybe_float(text: str | None):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


# --------------------------------------------------------------------------- Approach 2


def approach2(rows: list[dict], min_points: int = 3) -> dict:
    """Chinchilla Approach 2: IsoFLOP parabolas, then power laws through their vertices.

    ``per_budget`` entries: budget, n_opt, d_opt, loss_min, coeffs (np.polyfit order, in
    x = log10 N) and in_range (the vertex lies within the sampled N). ``skipped``: budgets
    left out, with the reason. Raises ValueError when fewer than 2 budgets are usable."""
    groups: dict[float, list[dict]] = defaultdict(list)
    for row in rows:
        groups[group_key(row)].append(row)
    per_budget, skipped = [], []
    for budget, runs in sorted(groups.items()):
        x = np.log10([r["N"] for r in runs])
        loss = np.array([r["loss"] for r in runs], dtype=float)
        if len(np.unique(x)) < max(min_points, 3):
            skipped.append(
                {
                    "budget": budget,
                    "n_runs": len(runs),
                    "reason": f"{len(np.unique(x))} distinct model sizes, need >= {max(min_points, 3)}",
                }
            )
            continue
        coeffs = np.polyfit(x, loss, 2)
        c2, c1, c0 = coeffs
        if c2 <= 0:
            skipped.append(
                {
                    "budget": budget,
                    "n_runs": len(runs),
                    "reason": f"parabola curvature {c2:.3g} <= 0 (no minimum in log N)",
                }
            )
            continue
        x_opt = -c1 / (2 * c2)
        n_opt = 10.0**x_opt
        per_budget.append(
            {
                "budget": budget,
                "n_opt": n_opt,
                "d_opt": budget / (6 * n_opt),
                "loss_min": float(c0 - c1**2 / (4 * c2)),
                "coeffs": [float(c) for c in coeffs],
                "n_runs": len(runs),
                "in_range": bool(x.min() <= x_opt <= x.max()),
            }
        )
    if len(per_budget) < 2:
        why = "; ".join(f"budget {s['budget']:.3g}: {s['reason']}" for s in skipped) or "no other budgets"
        raise ValueError(
            f"approach2 needs >= 2 budgets with a fitted IsoFLOP minimum, got {len(per_budget)} "
            f"of {len(groups)} ({why})"
        )
    log_c = np.log10([p["budget"] for p in per_budget])
    a, log_kn = np.polyfit(log_c, np.log10([p["n_opt"] for p in per_budget]), 1)
    b, log_kd = np.polyfit(log_c, np.log10([p["d_opt"] for p in per_budget]), 1)
    return {
        "per_budget": per_budget,
        "skipped": skipped,
        "a": float(a),
        "k_n": float(10**log_kn),
        "b": float(b),
        "k_d": float(10**log_kd),
        "n_runs": sum(p["n_runs"] for p in per_budget),
        "convention": CONVENTION + "; N_opt = k_n*C^a, D_opt = k_d*C^b",
    }


def power_law_optimal(fit2: dict, C) -> dict:
    """Approach 2's N_opt, D_opt at compute C (float or array); Approach 2 has no loss law."""
    C = np.asarray(C, dtype=float)
    n, d = fit2["k_n"] * C ** fit2["a"], fit2["k_d"] * C ** fit2["b"]
    return _scalars({"C": C, "N": n, "D": d, "tokens_per_param": d / n})


# --------------------------------------------------------------------------- Approach 3


def huber_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_runs Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) and its gradient in θ.

    theta: [..., 5] in ``PARAMS`` order (a leading batch of starts is allowed); returns
    objective [...] and gradient [..., 5]. Runs are the last axis [R] of the data arrays."""
    theta = np.asarray(theta, dtype=float)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))  # [..., 1]
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e), axis=0)  # [3, ..., R]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    w /= total  # softmax weights = ∂LSE/∂(term)
    r = top + np.log(total) - log_loss  # [..., R]
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=-1)
    dr = np.where(small, r, delta * np.sign(r))  # Huber'(r)
    grad = np.stack(
        [
            (dr * w[0]).sum(-1),
            (dr * w[1]).sum(-1),
            (dr * w[2]).sum(-1),
            -(dr * w[0] * log_n).sum(-1),
            -(dr * w[1] * log_d).sum(-1),
        ],
        axis=-1,
    )
    return value, grad


def init_grid_points(grid: dict | None = None) -> np.ndarray:
    """The Cartesian grid of starts, [K, 5] in ``PARAMS`` order (Hoffmann's by default)."""
    grid = HOFFMANN_GRID if grid is None else grid
    return np.array(list(itertools.product(*(grid[p] for p in PARAMS))), dtype=float)


def _minimise(theta0: np.ndarray, data: tuple, delta: float) -> tuple[np.ndarray, float]:
    # The objective is scaled by 1/δ for L-BFGS-B (≈ Σ|r|, O(1)); the minimiser is the same.
    fun = lambda t: tuple(v / delta for v in huber_objective(t, *data, delta))
    res = minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "maxfun": 4000, "ftol": 1e-14, "gtol": 1e-10},
    )
    return res.x, float(res.fun) * delta


def _fit_from(starts: np.ndarray, data: tuple, delta: float) -> tuple[np.ndarray, float]:
    with _single_threaded_blas():
        return min((_minimise(s, data, delta) for s in starts), key=lambda tv: tv[1])


def _single_threaded_blas():
    """SciPy >= 1.15's L-BFGS-B makes BLAS calls on 5-vectors; a multi-threaded OpenBLAS makes each
    step ~10x slower (scipy/scipy#22438). Limit BLAS to one thread when threadpoolctl is installed;
    else export OPENBLAS_NUM_THREADS=1 before numpy loads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _exp(v: float) -> float:
    """e^v, inf past float range: a bootstrap resample of few runs can send a or b to ~1e3."""
    return math.exp(v) if v < 709 else math.inf


def _as_fit(theta: np.ndarray, objective: float, n_runs: int) -> dict:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {
        "E": _exp(e),
        "A": _exp(a),
        "B": _exp(b),
        "alpha": alpha,
        "beta": beta,
        "loss": objective,
        "n_runs": n_runs,
        "convention": CONVENTION + "; L = E + A/N^alpha + B/D^beta",
    }


def approach3(
    rows: list[dict],
    delta: float = 1e-3,
    init_grid: dict | np.ndarray | str | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    *,
    target_c: float | None = None,
    n_starts: int = DEFAULT_STARTS,
) -> dict:
    """Chinchilla Approach 3, fitted as Besiroglu et al. 2024 (see the module docstring).

    init_grid: None (Hoffmann's 4500-point grid, evaluated in one vectorised pass, with
    L-BFGS-B from the ``n_starts`` best points), "full" (L-BFGS-B from all 4500, slow), a
    {param: values} grid, or starts [K, 5] in ``PARAMS`` order (L-BFGS-B from each).
    bootstrap > 0 adds ``ci``: 2.5/97.5 percentiles of E, A, B, alpha, beta and of
    tokens_per_param at ``target_c`` (default: the largest C among the rows) over fits to runs
    resampled with replacement, each refitted from the best θ and 2 jittered copies."""
    if len(rows) < 5:
        raise ValueError(f"approach3 fits 5 parameters and needs >= 5 runs, got {len(rows)}")
    data = tuple(np.log(np.array([r[k] for r in rows], dtype=float)) for k in ("N", "D", "loss"))
    if isinstance(init_grid, str):
        if init_grid != "full":
            raise ValueError(f"init_grid must be None, 'full', a grid dict or a [K, 5] array, got {init_grid!r}")
        starts = init_grid_points()
    elif init_grid is None:
        grid = init_grid_points()
        value, _ = huber_objective(grid, *data, delta)
        starts = grid[np.argsort(value)[:n_starts]]
    else:
        starts = init_grid_points(init_grid) if isinstance(init_grid, dict) else np.atleast_2d(init_grid)
    theta, objective = _fit_from(starts, data, delta)
    fit = _as_fit(theta, objective, len(rows))
    if bootstrap > 0:
        fit["ci"] = _bootstrap(
            theta, data, delta, bootstrap, seed, target_c if target_c is not None else max(r["C"] for r in rows)
        )
    return fit


def _bootstrap(theta: np.ndarray, data: tuple, delta: float, count: int, seed: int, target_c: float) -> dict:
    rng = np.random.default_rng(seed)
    n_runs = len(data[0])
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(count):
        idx = rng.integers(0, n_runs, n_runs)
        starts = np.vstack([theta, theta + rng.normal(0, 0.1, (2, 5))])
        fit = _as_fit(*_fit_from(starts, tuple(x[idx] for x in data), delta), n_runs)
        for key in ("E", "A", "B", "alpha", "beta"):
            samples[key].append(fit[key])
        samples["tokens_per_param"].append(compute_optimal(fit, target_c)["tokens_per_param"])
    ci = {k: [float(q) for q in np.nanpercentile(v, [2.5, 97.5])] for k, v in samples.items()}
    return {**ci, "target_c": target_c, "n_resamples": count}


def predict_loss(fit3: dict, N, D):
    """L(N, D) = E + A/N^α + B/D^β."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return fit3["E"] + fit3["A"] / N ** fit3["alpha"] + fit3["B"] / D ** fit3["beta"]


def compute_optimal(fit3: dict, C) -> dict:
    """argmin L(N, D) subject to 6·N·D = C (float or array), in closed form; needs α, β > 0."""
    A, B, alpha, beta = fit3["A"], fit3["B"], fit3["alpha"], fit3["beta"]
    if alpha <= 0 or beta <= 0:
        return _scalars(
            {k: np.full(np.shape(C), np.nan) for k in ("N", "D", "tokens_per_param", "loss")}
            | {"C": np.asarray(C, dtype=float)}
        )
    C = np.asarray(C, dtype=float)
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = g * (C / 6) ** (beta / (alpha + beta))
    d = (C / 6) ** (alpha / (alpha + beta)) / g
    return _scalars({"C": C, "N": n, "D": d, "tokens_per_param": d / n, "loss": predict_loss(fit3, n, d)})


def assess(fit2: dict | None, fit3: dict | None) -> list[str]:
    """Why a fit should not be trusted, one phrase per problem (empty: no objection). Physical
    laws need loss to fall with both model size and data (alpha, beta > 0), a positive irreducible
    loss E, finite coefficients, and compute-optimal N and D that both grow with C (0 < a < 1)."""
    problems = []
    if fit3 is not None:
        for name, what in (("alpha", "model size"), ("beta", "data")):
            value = fit3[name]
            if not (math.isfinite(value) and value > 0):
                problems.append(f"Approach 3's {name} = {value:.3g} <= 0 says loss does not fall with {what}")
        if not all(math.isfinite(fit3[k]) for k in ("E", "A", "B")):
            problems.append("Approach 3's coefficients overflow (A or B infinite)")
        elif fit3["E"] < 1e-6:
            problems.append(f"Approach 3's irreducible loss E = {fit3['E']:.3g} collapsed to zero")
    if fit2 is not None:
        if not 0 < fit2["a"] < 1:
            problems.append(f"Approach 2's N_opt ~ C^{fit2['a']:.3f}: N and D do not both grow with compute")
        outside = [p["budget"] for p in fit2["per_budget"] if not p["in_range"]]
        if outside:
            problems.append(
                f"Approach 2's minimum lies outside the sampled sizes at budget(s) "
                f"{', '.join(f'{b:.3g}' for b in outside)} (extrapolated)"
            )
    return problems


def _scalars(out: dict) -> dict:
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


# --------------------------------------------------------------------------- synthetic data


def synthetic_rows(
    E: float,
    A: float,
    B: float,
    alpha: float,
    beta: float,
    budgets,
    sizes_per_budget: int = 7,
    noise: float = 0.01,
    seed: int = 0,
    span: float = 1.0,
) -> list[dict]:
    """IsoFLOP rows drawn from L = E + A/N^α + B/D^β: per budget, ``sizes_per_budget`` N evenly
    spaced in log10 over the law's N_opt ± ``span`` decades, D = C/(6·N), and loss times
    exp(noise·z), z ~ N(0, 1) (σ = noise on log loss)."""
    rng = np.random.default_rng(seed)
    law = {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta}
    rows = []
    for C in budgets:
        n_opt = compute_optimal(law, C)["N"]
        for n in n_opt * np.logspace(-span, span, sizes_per_budget):
            d = C / (6 * n)
            loss = float(predict_loss(law, n, d) * np.exp(noise * rng.standard_normal()))
            rows.append(
                {
                    "name": f"C{C:.2g}_N{n:.3g}",
                    "C": float(C),
                    "N": float(n),
                    "D": float(d),
                    "loss": loss,
                    "budget": float(C),
                }
            )
    return rows
