"""Every command the documentation shows works as written.

Each fenced ``bash`` and ``python`` block of README.md and docs/*.md runs, in document order, in
one scratch directory laid out like the repository root (``train.py``, ``serve.py``, ``bench/``,
``configs`` linked in), so later blocks see what earlier ones wrote (``serve.py`` reads the
quickstart's ``runs/tiny``). A block passes when it exits 0. What the test changes, and only this:

- ``MOELA_MAX_STEPS`` caps every training run (README, "Train"), so the quickstart, the sweep
  and the mesh run take seconds; the scratch tfds data dir (``TFDS_DATA_DIR``) keeps the user's
  home untouched.
- ``pip install ...`` lines are not run (the suite runs inside that install): each must name an
  extra that ``pyproject.toml`` defines. The test-suite line must be CI's (``.ci/run``) and is
  not run from inside the suite.
- Placeholders a reader replaces are filled in: ``/path/to/DeepSeek-V3`` with a tiny random
  DeepSeek-V3 checkpoint in Hugging Face's format, ``in.npy`` with a few token ids.

The ``$ command`` lines of docs/*.txt (recorded outputs) are rerun and must reproduce the file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
LINKED = ("train.py", "serve.py", "bench", "pyproject.toml", "moela")
PLACEHOLDER_CHECKPOINT = "/path/to/DeepSeek-V3"


def blocks() -> list[tuple[str, int, str, str]]:
    """(file, line, language, text) of every runnable fenced block, in document order."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) in RUNNABLE:
                line = text[: m.start()].count("\n") + 1
                found.append((str(doc.relative_to(ROOT)), line, RUNNABLE[m.group(1)], m.group(2)))
    return found


def ci_test_command() -> str:
    (line,) = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "python -m pytest" in line]
    return line


def prepare_shell(text: str) -> str:
    """The block with its pip and test-suite commands checked and replaced by ``true``."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("&&")]
        kept = []
        for part in parts:
            if part.startswith("pip install"):
                named = re.findall(r"\.\[([\w,-]+)\]", part)
                for group in named:
                    assert set(group.split(",")) <= extras, f"'{part}' names an extra pyproject.toml lacks"
                kept.append("true")
            elif part.startswith("python -m pytest"):
                assert line.strip() in ci_test_command(), f"the documented test command differs from CI's: {line}"
                kept.append("true")
            else:
                kept.append(part)
        out.append(" && ".join(kept))
    return "\n".join(out)


def tiny_hf_checkpoint(directory: Path) -> None:
    """A random DeepSeek-V3 checkpoint in Hugging Face's layout (config.json + safetensors)."""
    pytest.importorskip("transformers")
    from tests.test_hf_parity import CASES, build_hf

    build_hf("v3", CASES["qlora_plain_dense2"], seed=0).save_pretrained(directory)


def scratch_env(work: Path) -> dict:
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    np.save(work / "in.npy", np.array([[1, 5, 9, 2, 7, 3]], dtype=np.int32))
    env = {
        **os.environ,
        "MOELA_MAX_STEPS": "4",
        "TFDS_DATA_DIR": str(work / "tensorflow_datasets"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("XLA_FLAGS", None)
    return env


def test_the_docs_have_commands_and_pip_and_pytest_lines_are_checked_not_run():
    found = blocks()
    assert len(found) >= 8 and {language for *_, language, _ in found} == {"bash", "python"}, found
    quickstart = found[0][3]
    assert prepare_shell(quickstart).splitlines() == ["true && python train.py --config tiny", "true && true && true"]
    with pytest.raises(AssertionError, match="names an extra pyproject.toml lacks"):
        prepare_shell("pip install -e '.[gpu]'")
    with pytest.raises(AssertionError, match="differs from CI's"):
        prepare_shell("python -m pytest -q")


@pytest.mark.slow
def test_every_documented_command_runs_in_order(tmp_path):
    """One test, not one per block: later blocks use what earlier ones wrote (serve.py reads the
    quickstart's run), so they must run in order in one place, whatever pytest-xdist does."""
    work = tmp_path
    env = scratch_env(work)
    for where, line, language, text in blocks():
        if PLACEHOLDER_CHECKPOINT in text:
            hf = work / "hf_deepseek_v3"
            if not hf.exists():
                tiny_hf_checkpoint(hf)
            text = text.replace(PLACEHOLDER_CHECKPOINT, str(hf))
        if language == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", prepare_shell(text)]
        else:
            cmd = [sys.executable, "-c", text]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        print(f"{where}:{line} ({language}) exit {done.returncode} in {time.perf_counter() - start:.1f} s")
        assert done.returncode == 0, f"{where}:{line} failed ({done.returncode}):\n{text}\n{done.stderr[-4000:]}"


def recorded_commands() -> list[tuple[str, str, str]]:
    """(file, command, recorded output) for each ``$ command`` section of docs/*.txt."""
    found = []
    for doc in sorted((ROOT / "docs").glob("*.txt")):
        sections = re.split(r"^\$ ", doc.read_text(), flags=re.M)[1:]
        for section in sections:
            command, _, output = section.partition("\n")
            found.append((doc.name, command, output.strip()))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where,command,recorded", recorded_commands(), ids=[c[1][:60] for c in recorded_commands()])
def test_recorded_outputs_are_reproduced(where, command, recorded):
    done = subprocess.run(command.split(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).strip() == recorded, f"docs/{where}: '$ {command}' prints something else now"
