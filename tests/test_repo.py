"""House rules a reviewer would otherwise check by hand."""

from __future__ import annotations

import re
from pathlib import Path

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
    big = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
           if ".git" not in p.parts and len(p.read_text().splitlines()) > 600]
    assert not big, f"split these by concept: {big}"
