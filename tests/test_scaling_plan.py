"""IsoFLOP planning, families, the sweep runner and the ``python -m moela.scaling`` CLI.

Fast tests plan the ``cpu_tiny`` family (parameter counts only) and drive the runner with a fake
trainer; the slow one plans two real runs of a few steps on a small corpus, trains them with
``train.py`` and fits nothing (two runs): it checks the rows the runner appends.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from moela.configs import load, load_json
from moela.scaling.__main__ import main
from moela.scaling.family import FamilyError, load_family
from moela.model.flops import SCALING_CONVENTION, flops_per_token
from moela.scaling.plan import PlanError, deepseek_batch_tokens, deepseek_lr, parse_budgets, run_name
from moela.scaling.run import PREEMPTED, RunError, parse_shard, read_rows, run_sweep, shard

ROOT = Path(__file__).resolve().parent.parent
TINY = "cpu_tiny"
BUDGETS = "1e14,1e15"  # both windows (±0.5 decade around sqrt(C/120)) lie inside cpu_tiny's range


@pytest.fixture(scope="module")
def tiny():
    return load_family(TINY)


def cli(capsys, *argv) -> tuple[int, dict | None, str]:
    """Run ``python -m moela.scaling`` in-process: (exit code, last-line JSON or None, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), err


def plan(capsys, out: Path, *extra, budgets: str = BUDGETS, sizes: int = 5) -> dict:
    code, result, err = cli(
        capsys, "plan", "--budgets", budgets, "--family", TINY, "--out", out, "--sizes", sizes, *extra
    )
    assert code == 0, err
    return result


def manifest_runs(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["runs"]


# ------------------------------------------------------------------------------------------ families


def test_family_n_is_the_exact_flops_count(tiny):
    """The rule's affine-in-depth N equals scaling.flops on the built config."""
    for layers, width in [(1, 32), (1, 64), (3, 128), (5, 256), (8, 512)]:
        model = tiny.sizer.build(layers, width)
        assert tiny.sizer.n_of(layers, width) == flops_per_token(model, tiny.seq_len) / 6
        head_dim = 64 if width >= 128 else 32  # cpu_tiny's narrowest models use 32-dim heads
        assert model.attention.num_heads == width // head_dim and model.vocab_size == 1024


@pytest.mark.parametrize(
    "path", ["cpu_tiny", pytest.param("dense", marks=pytest.mark.slow), pytest.param("moe", marks=pytest.mark.slow)]
)
def test_family_rules_are_monotone_and_close(path):
    family = load_family(path)
    lo, hi = family.sizer.n_range()
    targets = np.geomspace(lo * 1.5, min(hi / 1.5, lo * 300), 9 if path == "cpu_tiny" else 4)
    models = [family.model_for(t) for t in targets]
    ns = [family.n_of(m) for m in models]
    assert ns == sorted(ns)
    for t, n, m in zip(targets, ns, models):
        assert abs(math.log(n / t)) < math.log(1.6), (t, n)
        assert 32 <= m.d_model / m.num_layers <= 128  # aspect 64, band 2
    if path == "moe":
        assert {m.moe.num_experts for m in models} == {16} and {m.moe.experts_per_token for m in models} == {2}
        assert [m.moe.d_ff for m in models] == sorted(m.moe.d_ff for m in models)
        assert all(m.moe.d_ff >= m.d_model / 2 for m in models)


def test_family_errors(tiny, tmp_path):
    with pytest.raises(FamilyError, match="outside this family's range"):
        tiny.model_for(1e3)
    with pytest.raises(FamilyError, match="not found"):
        load_family(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("X = 1\n")
    with pytest.raises(FamilyError, match="must define get_family"):
        load_family(tmp_path / "bad.py")


# ------------------------------------------------------------------------------------------ plan


def test_deepseek_rule_values():
    """DeepSeek LLM sec. 3.1 at C = 1e20: B = 0.292·1e20^0.3271 = 1.0171e6 tokens, η = 0.3118·1e20^-0.125
    = 9.860e-4 (computed by hand from the formula)."""
    assert deepseek_batch_tokens(1e20) == pytest.approx(1.0171e6, rel=1e-3)
    assert deepseek_lr(1e20) == pytest.approx(9.860e-4, rel=1e-3)


def test_grid_properties(capsys, tmp_path, tiny):
    result = plan(capsys, tmp_path / "p")
    runs = manifest_runs(tmp_path / "p")
    assert result["runs"] == len(runs) == 10 and result["convention"] == SCALING_CONVENTION
    for budget in (1e14, 1e15):
        grid = [r for r in runs if r["budget"] == budget]
        targets = [r["target_n"] for r in grid]
        ratios = np.diff(np.log10(targets))
        np.testing.assert_allclose(ratios, 0.25, atol=1e-5)  # 5 sizes over 1 decade
        assert math.sqrt(targets[0] * targets[-1]) == pytest.approx(math.sqrt(budget / 120), rel=1e-5)
        ns = [r["N"] for r in grid]
        assert ns == sorted(ns) and len({(r["layers"], r["d_model"]) for r in grid}) == 5
        # DeepSeek rule at this budget, clamped into cpu_tiny's bounds, a divisor of eval_rows
        assert {r["lr"] for r in grid} == {float(f"{min(max(deepseek_lr(budget), 1e-4), 1e-2):.4g}")}
    for r in runs:
        step_tokens = r["batch"] * r["seq_len"]
        assert r["D"] == r["steps"] * step_tokens and r["C"] == r["flops_per_token"] * r["D"]
        assert abs(r["C"] - r["budget"]) <= 0.5 * r["flops_per_token"] * step_tokens  # within half a step
        assert r["N"] == r["flops_per_token"] / 6 and 6 * r["N"] * r["D"] == pytest.approx(r["C"], rel=1e-12)
        assert 4 <= r["batch"] <= 64 and 360 % r["batch"] == 0
        assert r["name"] == run_name(r["budget"], r["N"]) and "+" not in r["name"]
        cfg = load_json(r["config"])
        assert cfg == load(r["preset"]) and cfg.name == r["name"] and cfg.train.out_dir == r["run_dir"]
        t = cfg.train
        assert (t.steps, t.global_batch_size, t.learning_rate) == (r["steps"], r["batch"], r["lr"])
        assert 1 <= t.warmup_steps < t.steps and t.eval_batches * t.global_batch_size == 360
        assert flops_per_token(cfg.model, t.seq_len) == r["flops_per_token"]
    assert [json.loads(x) for x in (tmp_path / "p" / "manifest.jsonl").read_text().splitlines()] == runs


@pytest.mark.slow
def test_run_names_are_deterministic(capsys, tmp_path):
    assert run_name(1e15, 2.3114e7) == "iso-C1e15-N2.31e07"
    assert run_name(3e20, 1.234e9) == "iso-C3e20-N1.23e09"
    plan(capsys, tmp_path / "a")
    plan(capsys, tmp_path / "b")
    assert [r["name"] for r in manifest_runs(tmp_path / "a")] == [r["name"] for r in manifest_runs(tmp_path / "b")]


@pytest.mark.slow
def test_batch_and_lr_rules_clamp_and_fixed(capsys, tmp_path, tiny):
    # a tiny C: the rule's batch (545 tokens = 4.3 rows) lands on the floor of 4, its lr (0.0175) on the cap
    plan(capsys, tmp_path / "low", "--span", "0.3", "--force", budgets="1e10", sizes=2)
    runs = manifest_runs(tmp_path / "low")
    assert deepseek_lr(1e10) > 1e-2 and {r["lr"] for r in runs} == {1e-2} and {r["batch"] for r in runs} == {4}
    # a large C: the rule's batch (0.292·1e17^0.3271 tokens = 830 rows) is capped at 64 (a divisor of 360: 60)
    plan(capsys, tmp_path / "high", "--span", "0.3", budgets="1e17")
    assert {r["batch"] for r in manifest_runs(tmp_path / "high")} == {60}
    plan(capsys, tmp_path / "dp", "--dp", "4")
    assert all(r["batch"] % 4 == 0 and 360 % r["batch"] == 0 for r in manifest_runs(tmp_path / "dp"))
    plan(capsys, tmp_path / "fixed", "--batch-rule", "fixed", "--lr-rule", "fixed")
    fixed = manifest_runs(tmp_path / "fixed")
    assert {r["batch"] for r in fixed} == {tiny.base.train.global_batch_size}
    assert {r["lr"] for r in fixed} == {tiny.base.train.learning_rate}


@pytest.mark.slow
def test_replan_is_idempotent_and_a_different_plan_is_refused(capsys, tmp_path):
    out = tmp_path / "p"
    assert plan(capsys, out)["unchanged"] is False
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert plan(capsys, out)["unchanged"] is True
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp
    code, _, err = cli(capsys, "plan", "--budgets", "1e14,2e15", "--family", TINY, "--out", out, "--sizes", 5)
    assert code == 2 and "already holds a different plan" in err and "budgets" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = cli(
        capsys, "plan", "--budgets", BUDGETS, "--family", TINY, "--out", tmp_path / "other", "--sizes", 5
    )
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budgets", "0,1e15"], "must be a finite number of FLOPs > 0"),
        (["--budgets", "1e15,-1e15"], "> 0"),
        (["--budgets", "lots"], "comma-separated numbers"),
        (["--sizes", "4"], "between 5 and 9"),
        (["--sizes", "10"], "--force"),
        (["--span", "9"], "wider than the family's range"),
        (["--family", "nope"], "not found"),
    ],
)
def test_bad_plan_input_is_one_error(capsys, tmp_path, args, message):
    argv = {"--budgets": BUDGETS, "--family": TINY, "--out": str(tmp_path / "p"), "--sizes": "5"}
    argv.update(dict(zip(args[::2], args[1::2])))
    code, _, err = cli(capsys, "plan", *[x for kv in argv.items() for x in kv])
    assert code == 2 and err.count("error:") == 1 and message in err, err
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_family_without_get_family_exits_2(capsys, tmp_path):
    (tmp_path / "fam.py").write_text("def get_config():\n    return None\n")
    code, _, err = cli(capsys, "plan", "--budgets", BUDGETS, "--family", tmp_path / "fam.py", "--out", tmp_path / "p")
    assert code == 2 and "must define get_family()" in err


def test_force_allows_few_sizes(capsys, tmp_path):
    assert plan(capsys, tmp_path / "p", "--force", sizes=3)["runs"] == 6
    with pytest.raises(PlanError):
        parse_budgets("1e15,1e15")


# ------------------------------------------------------------------------------------------ run


def test_shards_partition_the_runs():
    runs = [{"name": str(k)} for k in range(11)]
    parts = [shard(runs, i, 3) for i in range(3)]
    assert sorted(int(r["name"]) for p in parts for r in p) == list(range(11))
    assert [r["name"] for r in parts[1]] == ["1", "4", "7", "10"]
    assert parse_shard(None) == (0, 1) and parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(RunError):
            parse_shard(bad)


class FakeTrainer:
    """Stands in for train.py: a loss from N and D, or a failure for chosen runs."""

    def __init__(self, fail=(), code=1):
        self.calls, self.fail, self.code = [], set(fail), code

    def __call__(self, run: dict) -> dict:
        self.calls.append(run["name"])
        if run["name"] in self.fail:
            return {"exit_code": self.code, "error": "error: boom"}
        loss = 2 + 400 / run["N"] ** 0.34 + 400 / run["D"] ** 0.28
        return {"exit_code": 0, "eval_loss": loss, "flops_per_token": run["flops_per_token"]}


def test_run_skips_finished_rows_records_failures_and_resumes(capsys, tmp_path):
    out = tmp_path / "p"
    plan(capsys, out)
    names = [r["name"] for r in manifest_runs(out)]
    quiet = lambda *a, **k: None  # noqa: E731
    first = FakeTrainer(fail={names[3]})
    summary = run_sweep(out / "manifest.json", trainer=first, log=quiet)
    assert first.calls == names and summary["failed"] == [names[3]] and summary["trained"] == 9
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 10 and "boom" in rows[3]["error"] and rows[3]["loss"] is None
    good = [r for r in rows if not r.get("error")]
    for r in good:
        assert r["C"] == pytest.approx(6 * r["N"] * r["D"], rel=1e-12) and r["convention"] == SCALING_CONVENTION
        assert {
            "n_total",
            "n_active",
            "n_non_embedding",
            "flops_per_token",
            "tokens",
            "steps",
            "wall_s",
            "run_dir",
            "budget",
            "name",
        } <= r.keys()
    second = FakeTrainer()
    summary = run_sweep(out, trainer=second, log=quiet)  # the plan directory works too
    assert second.calls == [names[3]] and summary["skipped"] == 9
    assert run_sweep(out / "manifest.jsonl", trainer=(third := FakeTrainer()), log=quiet)["trained"] == 0
    assert third.calls == []
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 11 and csv_lines[0].startswith("name,budget,C,N,D,loss")


def test_run_shards_share_one_results_file_and_sigterm_stops(capsys, tmp_path):
    out = tmp_path / "p"
    plan(capsys, out)
    quiet = lambda *a, **k: None  # noqa: E731
    a, b = FakeTrainer(), FakeTrainer()
    run_sweep(out, "0/2", trainer=a, log=quiet)
    run_sweep(out, "1/2", trainer=b, log=quiet)
    assert not set(a.calls) & set(b.calls) and len(a.calls) + len(b.calls) == 10
    assert len(read_rows(out / "results.jsonl")) == 10
    other = tmp_path / "r.jsonl"
    stop = FakeTrainer(fail={manifest_runs(out)[1]["name"]}, code=PREEMPTED)
    summary = run_sweep(out, results=other, trainer=stop, log=quiet)
    assert summary["stopped"] and len(stop.calls) == 2 and len(read_rows(other)) == 1


def test_flops_mismatch_is_an_error_row(capsys, tmp_path):
    out = tmp_path / "p"
    plan(capsys, out)
    run_sweep(
        out, trainer=lambda run: {"exit_code": 0, "eval_loss": 3.0, "flops_per_token": 1}, log=lambda *a, **k: None
    )
    assert all("re-plan" in r["error"] for r in read_rows(out / "results.jsonl"))


def test_fit_and_plot_cli_on_results(capsys, tmp_path):
    """fit/plot read the runner's rows (failed rows left out) and end with a JSON line."""
    from moela.scaling.fit import synthetic_rows

    rows = synthetic_rows(
        E=1.8, A=480, B=2000, alpha=0.35, beta=0.37, budgets=[1e17, 1e18, 1e19], sizes_per_budget=7, noise=0.002, seed=0
    )
    rows.append({"name": "broken", "budget": 1e18, "C": 1e18, "N": 1e8, "D": 1.6e9, "loss": None, "error": "x"})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli(capsys, "fit", results, "--target", "1e21", "--out", tmp_path / "fit.json")
    assert code == 0, err
    assert out["runs"] == 21 and out["target"] == 1e21 and out["convention"] == SCALING_CONVENTION
    assert out["approach3_params"]["alpha"] == pytest.approx(0.35, abs=0.05)
    saved = json.loads((tmp_path / "fit.json").read_text())
    for key in ("approach2_optimal", "approach3_optimal"):
        assert saved[key]["C"] == 1e21 and saved[key]["N"] > 0 and saved[key]["tokens_per_param"] > 0
    code, out, err = cli(capsys, "plot", results, "--fit", tmp_path / "fit.json", "--out", tmp_path / "plots")
    assert code == 0, err
    assert out["plots"] and all(Path(p).is_file() for p in out["plots"])
    code, _, err = cli(capsys, "fit", tmp_path / "missing.jsonl")
    assert code == 2 and "not found" in err


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_cli_plan_run_round_trip(capsys, tmp_path, monkeypatch):
    """Two real runs of 20-60 steps (cpu_tiny at vocab 512 on a small corpus), trained by train.py
    subprocesses; a second ``run`` skips both."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(json.__file__).parent.glob("*.py")):
        shutil.copy(f, corpus / f.name.replace(".py", ".txt"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    out = tmp_path / "p"
    plan(
        capsys,
        out,
        "--force",
        "--span",
        "0.3",
        "--set",
        f"data.text_glob={corpus}/*.txt",
        "--set",
        f"data.data_dir={tmp_path / 'tfds'}",
        "--set",
        "model.vocab_size=512",
        budgets="6e9",
        sizes=2,
    )
    runs = manifest_runs(out)
    assert len(runs) == 2 and all(10 <= r["steps"] <= 60 for r in runs)
    code, summary, err = cli(capsys, "run", out / "manifest.json")
    assert code == 0, err + "".join((Path(r["run_dir"]) / "train.log").read_text()[-2000:] for r in runs)
    assert summary["trained"] == 2 and not summary["failed"]
    rows = read_rows(out / "results.jsonl")
    assert [r["name"] for r in rows] == [r["name"] for r in runs]
    for row, run in zip(rows, runs):
        assert 0 < row["loss"] < math.log(512) + 1 and row["C"] == pytest.approx(6e9, rel=0.1)
        assert (Path(run["run_dir"]) / "checkpoints").is_dir() and (Path(run["run_dir"]) / "train.log").is_file()
    code, summary, _ = cli(capsys, "run", out)
    assert code == 0 and summary["skipped"] == 2 and summary["trained"] == 0


def test_default_sizes_are_as_many_as_the_family_tells_apart(capsys, tmp_path):
    """The README's own example: without --sizes, 7 per budget where the family has the shapes,
    fewer (and a line saying so) where it has not; an explicit --sizes it cannot honour still fails."""
    code, result, err = cli(capsys, "plan", "--budgets", "1e12,3e12,1e13", "--family", TINY, "--out", tmp_path / "a")
    assert code == 0, err
    runs = manifest_runs(tmp_path / "a")
    per_budget = {b: sum(r["budget"] == b for r in runs) for b in (1e12, 3e12, 1e13)}
    assert (
        set(per_budget.values()) == {5}
        and json.loads((tmp_path / "a" / "manifest.json").read_text())["meta"]["sizes"] == 5
    )
    code, _, err = cli(
        capsys, "plan", "--budgets", "1e12,3e12,1e13", "--family", TINY, "--out", tmp_path / "b", "--sizes", 7
    )
    assert code == 2 and "too coarse" in err
    code, result, err = cli(capsys, "plan", "--budgets", BUDGETS, "--family", TINY, "--out", tmp_path / "c")
    assert code == 0 and len(manifest_runs(tmp_path / "c")) == 7 * len(BUDGETS.split(",")), err
