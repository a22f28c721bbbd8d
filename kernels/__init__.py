"""Attention ops with a backend chosen by config (``model.attention.impl``).

``xla`` is the pure-jnp reference (the CPU default); ``auto`` resolves per platform.
Pallas backends (flash attention, ragged paged attention) register here as they land.
"""

from __future__ import annotations

from kernels import reference

_BACKENDS = {"xla": reference.attention}


def resolve(impl: str) -> str:
    """Map ``auto`` to the best available backend for the default JAX platform."""
    if impl == "auto":
        return "xla"
    if impl not in _BACKENDS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: auto, {', '.join(sorted(_BACKENDS))}")
    return impl


def attention(q_bthk, k_bsgk, v_bsgv, *, scale: float, causal: bool = True, q_segment_ids=None,
              kv_segment_ids=None, impl: str = "auto"):
    """Causal (offset) attention with optional segment ids; returns (out, lse). See ``kernels.reference``."""
    fn = _BACKENDS[resolve(impl)]
    return fn(q_bthk, k_bsgk, v_bsgv, scale=scale, causal=causal,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


__all__ = ["attention", "resolve", "reference"]
