"""Attention ops with a backend chosen by config (``model.attention.impl``).

``reference`` is the plain jnp definition every backend is tested against (autodiff for its
gradient); ``xla`` computes the same in XLA ops with a flash-style hand-written backward
(``kernels.xla``, the CPU default); ``pallas`` is the flash-attention kernel of the default
platform (``kernels.flash``: Mosaic on TPU, Triton on GPU); ``interpret`` runs the TPU kernel
and ``interpret_gpu`` the GPU kernel through the Pallas interpreter (CPU tests); ``auto`` is
``pallas`` on TPU/GPU and ``xla`` elsewhere.

``attention_bwd`` is the backward of one attention block as its own op: given the output and
log-sum-exp of the *whole* attention the block is part of, it returns the block's exact share
of dq, dk, dv. Ring attention (``parallel.ring``) calls it once per ring step; a backend
registers its forward in ``_BACKENDS`` and this backward in ``_BWD_BACKENDS``. ``reference``
has no separate backward formula: it routes to the ``xla`` one, which its tests pin to
autodiff of the reference.
"""

from __future__ import annotations

import jax

from moela.kernels import flash, reference, xla

_BACKENDS = {"xla": xla.attention, "reference": reference.attention, "pallas": flash.pallas,
             "interpret": flash.interpret_tpu, "interpret_gpu": flash.interpret_gpu}
_BWD_BACKENDS = {"xla": xla.attention_bwd, "reference": xla.attention_bwd, "pallas": flash.pallas_bwd,
                 "interpret": flash.interpret_tpu_bwd, "interpret_gpu": flash.interpret_gpu_bwd}
IMPLS = ("auto", *_BACKENDS)


def resolve(impl: str) -> str:
    """Map ``auto`` to the best available backend for the default JAX platform."""
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"
    if impl not in _BACKENDS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: auto, {', '.join(sorted(_BACKENDS))}")
    return impl


def attention(q_bthk, k_bsgk, v_bsgv, *, scale: float, causal: bool = True, q_segment_ids=None,
              kv_segment_ids=None, impl: str = "auto"):
    """Causal (offset) attention with optional segment ids; returns (out, lse). See ``kernels.reference``."""
    fn = _BACKENDS[resolve(impl)]
    return fn(q_bthk, k_bsgk, v_bsgv, scale=scale, causal=causal,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def attention_bwd(q_bthk, k_bsgk, v_bsgv, out_bthv, lse_bht, d_out_bthv, *, scale: float, causal: bool = True,
                  q_segment_ids=None, kv_segment_ids=None, d_lse_bht=None, impl: str = "auto"):
    """Flash-attention backward of one block: (dq [B,T,H,K], dk [B,S,G,K], dv [B,S,G,V]) in the inputs' dtypes.

    ``out_bthv`` [B,T,H,V] and ``lse_bht`` [B,H,T] are the final output and log-sum-exp of the
    attention this block belongs to (for a lone block: what ``attention`` returned). With
    P = exp(s - lse) on the block's visible (mask) entries, delta = rowsum(dO ⊙ O):

        dv = Pᵀ·dO    dS = P ⊙ (dO·Vᵀ - delta + dlse)    dq = scale·dS·K    dk = scale·dSᵀ·Q

    ``d_lse_bht`` (default zeros) is the cotangent of the log-sum-exp. Rows with lse -inf
    (nothing visible) contribute nothing; under GQA dk/dv sum over each kv head's query heads.
    Masking (``causal`` with offset S - T, segment ids) is that of ``attention``.
    """
    fn = _BWD_BACKENDS[resolve(impl)]
    return fn(q_bthk, k_bsgk, v_bsgv, out_bthv, lse_bht, d_out_bthv, scale=scale, causal=causal,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, d_lse_bht=d_lse_bht)


__all__ = ["IMPLS", "attention", "attention_bwd", "resolve", "reference"]
