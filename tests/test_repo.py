"""House rules a reviewer would otherwise check by hand."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quickstart\n(.*?)^## ", text, re.S | re.M).group(1)
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_the_two_commands_and_ci_runs_the_test_one_verbatim():
    lines = quickstart_lines()
    assert len(lines) == 2
    main, tests = lines
    assert "train.py --config tiny" in main and "pip install" in main
    assert "pytest" in tests and "pip install -e '.[test]'" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_python_files_stay_small():
    big = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if ".git" not in p.parts and len(p.read_text().splitlines()) > 600
    ]
    assert not big, f"split these by concept: {big}"


def test_only_moela_is_installed_at_the_top_of_site_packages():
    """Generic top-level names (kernels, model, data, ...) collide with other distributions:
    Hugging Face's ``kernels``, which transformers imports, is one."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["moela*"]
    assert "py-modules" not in pyproject["tool"]["setuptools"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["moela"], f"importable folders at the repository root: {packages}"
    top = importlib.metadata.distribution("moela").read_text("top_level.txt")
    if top is not None:  # written by non-editable installs
        assert top.split() == ["moela"]


def test_transformers_deepseek_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "-c", "from transformers import DeepseekV3ForCausalLM"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, for every non-stdlib import in moela/."""
    found = {}
    for path in sorted((ROOT / "moela").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top != "moela" and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_third_party_module_is_declared():
    declared = {
        re.split(r"[<>=\[;! ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    owners = importlib.metadata.packages_distributions()
    missing = []
    for module, where in third_party_imports().items():
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (imported in {where}; distribution {sorted(dists)})")
    assert not missing, "imported but not in [project.dependencies]: " + ", ".join(missing)


BACKTICKED = re.compile(r"`([\w.-]+(?:/[\w.-]*)+)`")
LINKED = re.compile(r"\]\(([^)#\s]+)")


def test_documents_name_only_files_in_the_repository():
    """A backticked path into the repository (``moela/...``, ``bench/...``, ``docs/...``) and every
    relative link must name something that exists; outputs (``runs/...``) are not checked."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    tops = {name.split("/")[0] for name in tracked}  # runs/ and other outputs are not tracked
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for name in BACKTICKED.findall(text):
            if name.split("/")[0] in tops and not (ROOT / name.rstrip("/")).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {name}")
        for link in LINKED.findall(text):
            if "://" not in link and not (doc.parent / link).exists():
                missing.append(f"{doc.relative_to(ROOT)}: ({link})")
    assert not missing, "documents name files that are not in the repository:\n" + "\n".join(missing)


def test_readme_is_a_manual_not_a_log():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


def test_benchmarks_import_the_installed_package():
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        assert "sys.path.insert" not in text and "noqa: E402" not in text, path.name
