"""The start-up allocator choice: which environment a re-executed process gets, and that the
re-execution really happens once and keeps the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moela.parallel import host

ROOT = Path(__file__).resolve().parent.parent
glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or host.platform.libc_ver()[0] != "glibc",
    reason="the allocator switch applies to Linux/glibc only",
)


@glibc_linux
def test_hugepages_tunable_is_added_to_existing_tunables(monkeypatch):
    monkeypatch.setattr(host, "find_tcmalloc", lambda: None)
    env = host.allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert "LD_PRELOAD" not in env


@glibc_linux
def test_tcmalloc_is_preloaded_when_found(monkeypatch):
    monkeypatch.setattr(host, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    env = host.allocator_env({"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4:/opt/other.so"
    assert host.allocator_env({**env}) is None  # applied once: no second re-execution


@glibc_linux
@pytest.mark.parametrize(
    "environ",
    [
        {"MOELA_ALLOCATOR": "system"},
        {"LD_PRELOAD": "/x/libjemalloc.so.2"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
    ],
)
def test_nothing_changes_when_the_user_already_chose(monkeypatch, environ):
    monkeypatch.setattr(host, "find_tcmalloc", lambda: None)
    assert host.allocator_env(environ) is None


def test_unknown_choice_and_missing_tcmalloc_are_clear_errors(monkeypatch):
    with pytest.raises(SystemExit, match="not one of auto, tcmalloc, hugepages, system"):
        host.allocator_env({"MOELA_ALLOCATOR": "fast"})
    if sys.platform == "linux" and host.platform.libc_ver()[0] == "glibc":
        monkeypatch.setattr(host, "find_tcmalloc", lambda: None)
        with pytest.raises(SystemExit, match="no tcmalloc library was found"):
            host.allocator_env({"MOELA_ALLOCATOR": "tcmalloc"})


@glibc_linux
def test_a_script_is_re_executed_once_with_its_arguments(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from moela.parallel.host import active_allocator, fast_allocator\n"
        "print('start', flush=True)\n"
        "fast_allocator()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'allocator': active_allocator()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MOELA_ALLOCATOR", "MOELA_ALLOCATOR_APPLIED")}
    env["MOELA_ALLOCATOR"] = "hugepages"
    done = subprocess.run(
        [sys.executable, str(script), "a b", "--flag"], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert lines.count("start") == 2  # the original process, then the re-executed one
    assert json.loads(lines[-1]) == {"argv": ["a b", "--flag"], "allocator": "hugepages"}
