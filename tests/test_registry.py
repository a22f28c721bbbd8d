"""One backend registry: every op with several implementations resolves names the same way, the
config offers exactly the registered names, and the helpers the kernels share are defined once."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from moela import kernels
from moela.configs.schema import RuntimeConfig
from moela.kernels.grouped import GROUPED
from moela.kernels.paged import PAGED
from moela.kernels.registry import BackendError, Backends
from moela.parallel.experts import DISPATCH

ROOT = Path(__file__).resolve().parent.parent
OPS = {"attention": kernels.ATTENTION, "paged_attention": PAGED, "grouped_matmul": GROUPED, "expert_dispatch": DISPATCH}


@pytest.mark.parametrize("field", sorted(OPS))
def test_the_runtime_config_offers_exactly_the_registered_backends(field):
    offered = typing.get_args(typing.get_type_hints(RuntimeConfig)[field])
    assert set(offered) == set(OPS[field].names)
    assert getattr(RuntimeConfig(), field) in offered


@pytest.mark.parametrize("field", sorted(OPS))
def test_an_unknown_name_gets_one_error_listing_the_valid_ones(field):
    backends = OPS[field]
    with pytest.raises(BackendError) as err:
        backends.resolve("nope")
    assert str(err.value) == f"unknown {backends.op} backend 'nope'; valid: {', '.join(backends.names)}"
    with pytest.raises(BackendError):
        backends["nope"]


def test_auto_means_the_platform_default():
    assert [kernels.ATTENTION.resolve("auto", on) for on in ("cpu", "tpu", "gpu")] == ["xla", "pallas", "pallas"]
    assert [PAGED.resolve("auto", on) for on in ("cpu", "tpu", "gpu")] == ["xla", "pallas", "pallas"]
    assert [GROUPED.resolve("auto", on) for on in ("cpu", "tpu", "gpu")] == ["blocked", "ragged_dot", "ragged_dot"]
    assert [DISPATCH.resolve("auto", on) for on in ("cpu", "tpu", "gpu")] == ["ring", "all_to_all", "all_to_all"]
    assert GROUPED.resolve("auto") == "blocked"  # this process: CPU
    assert GROUPED["auto"] is GROUPED.impls["blocked"]


def test_a_registry_must_name_real_backends_for_auto():
    with pytest.raises(ValueError, match="needs a '\\*' entry"):
        Backends("op", {"a": 1}, auto={"cpu": "a"})
    with pytest.raises(ValueError, match="unregistered backends \\['b'\\]"):
        Backends("op", {"a": 1}, auto={"*": "b"})


def test_kernel_helpers_are_defined_once():
    """The masking constant, rounding and lane helpers live in kernels/common.py only."""
    patterns = [r"-?1e30\b", r"^def _?(round_up|pow2|is_pow2|lanes|div|cdiv)\(", r"^(LANES|SUBLANES|NEG\w*) ="]
    found = []
    for path in sorted((ROOT / "moela" / "kernels").glob("*.py")):
        if path.name == "common.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in patterns):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, "defined again outside kernels/common.py:\n" + "\n".join(found)
