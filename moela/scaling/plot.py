"""Figures of the scaling-law fits (``scaling.fit``), written as PNGs with matplotlib's Agg backend.

``plot_all`` writes, into out_dir:
  isoflop.png    loss vs N per budget (log x), Approach 2's parabolas and vertices  [needs fit2]
  frontier.png   loss vs N of every run coloured by C, Approach 3's compute-optimal frontier if fit3
  optimal.png    N_opt(C) and D_opt(C), log-log, both approaches, to target_budget  [fit2 or fit3]
  residuals.png  Approach 3's predicted vs observed log loss, and the residual per run  [needs fit3]
A figure whose fit is missing, or whose values cannot be drawn on its log axes (a weak fit's
optimum can be negative, infinite or undefined), is left out, and ``plot_all`` says why; a fit
whose curve is undrawable is dropped from a figure that has other things to show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moela.scaling.fit import CONVENTION, compute_optimal, group_key, power_law_optimal, predict_loss


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(what: str, n_runs: int) -> str:
    return f"{what} ({n_runs} runs)\n{CONVENTION}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _budget_colours(budgets) -> dict:
    cmap = _pyplot().get_cmap("viridis")
    budgets = sorted(budgets)
    return {b: cmap(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}


def plot_isoflop(rows: list[dict], fit2: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = _budget_colours({group_key(r) for r in rows})
    fitted = {p["budget"]: p for p in fit2["per_budget"]}
    for budget, colour in colours.items():
        runs = [r for r in rows if group_key(r) == budget]
        n = np.array([r["N"] for r in runs])
        ax.scatter(
            n,
            [r["loss"] for r in runs],
            color=colour,
            s=18,
            label=f"C={budget:.2g}",
            marker="o" if budget in fitted else "x",
        )
        if budget in fitted:
            p = fitted[budget]
            x = np.linspace(np.log10(n.min()), np.log10(n.max()), 100)
            ax.plot(10**x, np.polyval(p["coeffs"], x), color=colour, lw=1)
            ax.plot(p["n_opt"], p["loss_min"], "*", color=colour, ms=12, mec="k", mew=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title(_title(f"IsoFLOP curves, Approach 2 parabolas; N_opt ~ C^{fit2['a']:.3f}", len(rows)), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_frontier(rows: list[dict], fit3: dict | None, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    c = np.array([r["C"] for r in rows])
    n = np.array([r["N"] for r in rows])
    points = ax.scatter(
        n, [r["loss"] for r in rows], c=c, norm=LogNorm(c.min(), c.max() * 1.0001), s=18, cmap="viridis"
    )
    fig.colorbar(points, ax=ax, label="C (training FLOPs)")
    title = "all runs"
    grid = np.logspace(np.log10(c.min()) - 0.5, np.log10(c.max()) + 0.5, 100)
    opt = compute_optimal(fit3, grid) if fit3 is not None else None
    if opt is not None and not (_drawable(opt["N"]) and _drawable(opt["loss"])):
        fit3 = None  # no frontier to draw; the runs still are
    if fit3 is not None:
        ax.plot(opt["N"], opt["loss"], "k-", lw=1.5, label="Approach 3 compute-optimal frontier")
        ax.axhline(fit3["E"], color="grey", ls=":", lw=1, label=f"E = {fit3['E']:.3f}")
        ax.legend(fontsize=8)
        title += f"; L = {fit3['E']:.3f} + {fit3['A']:.4g}/N^{fit3['alpha']:.3f} + {fit3['B']:.4g}/D^{fit3['beta']:.3f}"
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title(_title(title, len(rows)), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _drawable(values) -> bool:
    """Values a log axis can show: all finite and > 0."""
    values = np.asarray(values, dtype=float)
    return bool(values.size) and bool(np.all(np.isfinite(values) & (values > 0)))


def optimum_grid(rows: list[dict], target_budget: float | None = None) -> np.ndarray:
    """The budgets optimal.png draws N_opt and D_opt over: the runs' C (and the target), widened."""
    c_all = [r["C"] for r in rows] + ([target_budget] if target_budget else [])
    return np.logspace(np.log10(min(c_all)) - 0.3, np.log10(max(c_all)) + 0.3, 100)


def drawable_optima(fit2: dict | None, fit3: dict | None, grid) -> tuple[dict | None, dict | None, list[str]]:
    """The fits whose compute-optimal N and D are drawable over ``grid``; why the others are not."""
    why = []
    if fit2 is not None:
        opt = power_law_optimal(fit2, grid)
        if not (_drawable(opt["N"]) and _drawable(opt["D"])):
            why.append("Approach 2's optimum is not a positive finite number")
            fit2 = None
    if fit3 is not None:
        opt = compute_optimal(fit3, grid)
        if not (_drawable(opt["N"]) and _drawable(opt["D"])):
            finite = all(np.isfinite(fit3[k]) for k in ("E", "A", "B"))
            why.append(
                f"Approach 3 has no optimum (alpha = {fit3['alpha']:.3g}, beta = {fit3['beta']:.3g}; both must be > 0)"
                if finite
                else "Approach 3's coefficients are not finite"
            )
            fit3 = None
    return fit2, fit3, why


def plot_optimal(
    rows: list[dict], fit2: dict | None, fit3: dict | None, path: Path, target_budget: float | None = None
) -> Path:
    plt = _pyplot()
    grid = optimum_grid(rows, target_budget)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for ax, key, label in ((axes[0], "N", "N_opt (parameters)"), (axes[1], "D", "D_opt (tokens)")):
        if fit2 is not None:
            vertices = fit2["per_budget"]
            ax.plot(
                [p["budget"] for p in vertices],
                [p["n_opt" if key == "N" else "d_opt"] for p in vertices],
                "o",
                color="C0",
                label="Approach 2 IsoFLOP minima",
            )
            exponent = fit2["a" if key == "N" else "b"]
            ax.plot(grid, power_law_optimal(fit2, grid)[key], "-", color="C0", label=f"Approach 2: ~C^{exponent:.3f}")
        if fit3 is not None:
            alpha, beta = fit3["alpha"], fit3["beta"]
            exponent = (beta if key == "N" else alpha) / (alpha + beta)
            ax.plot(grid, compute_optimal(fit3, grid)[key], "--", color="C3", label=f"Approach 3: ~C^{exponent:.3f}")
        if target_budget:
            ax.axvline(target_budget, color="grey", ls=":", lw=1)
            for fit, fn, colour, dy in ((fit2, power_law_optimal, "C0", 4), (fit3, compute_optimal, "C3", -10)):
                if fit is not None:
                    value = fn(fit, target_budget)[key]
                    ax.plot(target_budget, value, "s", color=colour, mfc="none")
                    ax.annotate(
                        f"{value:.3g}",
                        (target_budget, value),
                        fontsize=7,
                        color=colour,
                        xytext=(4, dy),
                        textcoords="offset points",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (training FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    target = f", target C = {target_budget:.3g}" if target_budget else ""
    fig.suptitle(_title(f"compute-optimal N and D{target}", len(rows)), fontsize=9)
    return _save(fig, path)


def plot_residuals(rows: list[dict], fit3: dict, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    n, d, c, loss = (np.array([r[k] for r in rows], dtype=float) for k in ("N", "D", "C", "loss"))
    observed, predicted = np.log(loss), np.log(predict_loss(fit3, n, d))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    norm = LogNorm(c.min(), c.max() * 1.0001)
    axes[0].scatter(observed, predicted, c=c, norm=norm, s=18, cmap="viridis")
    lo, hi = min(observed.min(), predicted.min()), max(observed.max(), predicted.max())
    axes[0].plot([lo, hi], [lo, hi], "k-", lw=0.8)
    axes[0].set_xlabel("observed log loss")
    axes[0].set_ylabel("Approach 3 predicted log loss")
    points = axes[1].scatter(n, predicted - observed, c=c, norm=norm, s=18, cmap="viridis")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("N (parameters)")
    axes[1].set_ylabel("residual: predicted - observed log loss")
    fig.colorbar(points, ax=axes[1], label="C (training FLOPs)")
    for ax in axes:
        ax.grid(alpha=0.3)
    rms = float(np.sqrt(np.mean((predicted - observed) ** 2)))
    fig.suptitle(_title(f"Approach 3 residuals, RMS {rms:.4f} in log loss", len(rows)), fontsize=9)
    return _save(fig, path)


def plot_all(
    rows: list[dict], fit2: dict | None, fit3: dict | None, out_dir: str | Path, target_budget: float | None = None
) -> tuple[list[Path], dict[str, str]]:
    """Write the figures that can be drawn (see the module docstring): (paths written, {file left
    out: why}). A weak fit overflows on its way to those answers; numpy is not asked to warn."""
    with np.errstate(all="ignore"):
        return _plot_all(rows, fit2, fit3, out_dir, target_budget)


def _plot_all(rows, fit2, fit3, out_dir, target_budget) -> tuple[list[Path], dict[str, str]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, left_out = [], {}
    usable = [r for r in rows if all(_drawable([r[k]]) for k in ("N", "C", "loss"))]
    if len(usable) < len(rows):
        left_out["(runs)"] = (
            f"{len(rows) - len(usable)} run(s) with a non-positive or non-finite N, C or loss not drawn"
        )
    if not usable:
        left_out["all figures"] = "no run has a positive finite N, C and loss"
        return written, left_out
    rows = usable
    if fit2 is None:
        left_out["isoflop.png"] = "no Approach 2 fit"
    else:
        written.append(plot_isoflop(rows, fit2, out_dir / "isoflop.png"))
    written.append(plot_frontier(rows, fit3, out_dir / "frontier.png"))
    fit2_ok, fit3_ok, why = drawable_optima(fit2, fit3, optimum_grid(rows, target_budget))
    if fit2_ok is None and fit3_ok is None:
        left_out["optimal.png"] = "; ".join(why) or "no fit"
    else:
        written.append(plot_optimal(rows, fit2_ok, fit3_ok, out_dir / "optimal.png", target_budget))
    if fit3 is None:
        left_out["residuals.png"] = "no Approach 3 fit"
    elif not _drawable(predict_loss(fit3, [r["N"] for r in rows], [r["D"] for r in rows])):
        left_out["residuals.png"] = "Approach 3 predicts a non-positive or non-finite loss for some runs"
    else:
        written.append(plot_residuals(rows, fit3, out_dir / "residuals.png"))
    return written, left_out
