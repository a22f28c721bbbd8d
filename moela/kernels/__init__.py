"""Pure array ops, each with backends chosen by name (``moela.kernels.registry``).

``attention`` / ``attention_bwd`` (``ATTENTION``): causal (offset) attention with segment ids.
``reference`` is the plain jnp definition every backend is tested against (autodiff for its
gradient); ``xla`` computes the same in XLA ops with a flash-style hand-written backward
(``kernels.xla``, the CPU default); ``pallas`` is the flash-attention kernel of the default
platform (``kernels.flash``: Mosaic on TPU, Triton on GPU); ``interpret`` runs the TPU kernel
and ``interpret_gpu`` the GPU kernel through the Pallas interpreter (CPU tests); ``auto`` is
``pallas`` on TPU/GPU and ``xla`` elsewhere.

``attention_bwd`` is the backward of one attention block as its own op: given the output and
log-sum-exp of the *whole* attention the block is part of, it returns the block's exact share
of dq, dk, dv. Ring attention (``moela.parallel.ring``) calls it once per ring step. A backend
is a (forward, backward) pair; ``reference`` has no separate backward formula: it uses the
``xla`` one, which its tests pin to autodiff of the reference.

The other ops live in their modules: ``kernels.paged`` (ragged paged attention over the serving
cache, ``PAGED``), ``kernels.grouped`` (the experts' grouped matmul, ``GROUPED``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from moela.kernels import flash, reference, xla
from moela.kernels.registry import ANY, BackendError, Backends


class AttentionBackend(NamedTuple):
    forward: Callable
    backward: Callable


ATTENTION = Backends(
    "attention",
    {
        "xla": AttentionBackend(xla.attention, xla.attention_bwd),
        "reference": AttentionBackend(reference.attention, xla.attention_bwd),
        "pallas": AttentionBackend(flash.pallas, flash.pallas_bwd),
        "interpret": AttentionBackend(flash.interpret_tpu, flash.interpret_tpu_bwd),
        "interpret_gpu": AttentionBackend(flash.interpret_gpu, flash.interpret_gpu_bwd),
    },
    auto={"tpu": "pallas", "gpu": "pallas", ANY: "xla"},
)


def attention(
    q_bthk,
    k_bsgk,
    v_bsgv,
    *,
    scale: float,
    causal: bool = True,
    q_segment_ids=None,
    kv_segment_ids=None,
    backend: str = "auto",
):
    """Causal (offset) attention with optional segment ids; returns (out, lse). See ``kernels.reference``."""
    return ATTENTION[backend].forward(
        q_bthk, k_bsgk, v_bsgv, scale=scale, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids
    )


def attention_bwd(
    q_bthk,
    k_bsgk,
    v_bsgv,
    out_bthv,
    lse_bht,
    d_out_bthv,
    *,
    scale: float,
    causal: bool = True,
    q_segment_ids=None,
    kv_segment_ids=None,
    d_lse_bht=None,
    backend: str = "auto",
):
    """Flash-attention backward of one block: (dq [B,T,H,K], dk [B,S,G,K], dv [B,S,G,V]) in the inputs' dtypes.

    ``out_bthv`` [B,T,H,V] and ``lse_bht`` [B,H,T] are the final output and log-sum-exp of the
    attention this block belongs to (for a lone block: what ``attention`` returned). With
    P = exp(s - lse) on the block's visible (mask) entries, delta = rowsum(dO ⊙ O):

        dv = Pᵀ·dO    dS = P ⊙ (dO·Vᵀ - delta + dlse)    dq = scale·dS·K    dk = scale·dSᵀ·Q

    ``d_lse_bht`` (default zeros) is the cotangent of the log-sum-exp. Rows with lse -inf
    (nothing visible) contribute nothing; under GQA dk/dv sum over each kv head's query heads.
    Masking (``causal`` with offset S - T, segment ids) is that of ``attention``.
    """
    return ATTENTION[backend].backward(
        q_bthk,
        k_bsgk,
        v_bsgv,
        out_bthv,
        lse_bht,
        d_out_bthv,
        scale=scale,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        d_lse_bht=d_lse_bht,
    )


__all__ = ["ATTENTION", "AttentionBackend", "BackendError", "Backends", "attention", "attention_bwd", "reference"]
