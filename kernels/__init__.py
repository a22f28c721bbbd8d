"""Attention ops with a backend chosen by config (``model.attention.impl``).

``reference`` is the plain jnp definition every backend is tested against (autodiff for its
gradient); ``xla`` computes the same in XLA ops with a flash-style hand-written backward
(``kernels.xla``, the CPU default); ``auto`` resolves per platform. Pallas backends (flash
attention, ragged paged attention) register here as they land.
"""

from __future__ import annotations

from kernels import reference, xla

_BACKENDS = {"xla": xla.attention, "reference": reference.attention}


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
