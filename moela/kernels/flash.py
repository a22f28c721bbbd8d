"""Flash attention as one differentiable op over the Pallas kernels of ``flash_tpu`` / ``flash_gpu``.

``attention(..., target, interpret)`` is a ``jax.custom_vjp``: the forward kernel returns the
output and the log-sum-exp, which (with q, k, v) are all the backward keeps; the backward
runs the target's dq and dk/dv kernels, which recompute the probabilities from the lse.
``target`` picks the kernel family ("tpu": Mosaic, "gpu": Triton); ``interpret=True`` runs
that kernel through the Pallas interpreter, which is how CPU tests check it.

Backends registered in ``kernels.ATTENTION``: ``pallas`` (the kernel of the default platform),
``interpret`` (the TPU kernel, interpreted), ``interpret_gpu`` (the GPU kernel, interpreted).
"""

from __future__ import annotations

from functools import partial

import jax

from moela.kernels.registry import BackendError, platform

_TARGETS = ("tpu", "gpu")  # kernels.flash_tpu, kernels.flash_gpu (imported on first use)


def platform_target() -> str:
    """The kernel family for the default JAX platform: "tpu" or "gpu"; an error elsewhere."""
    on = platform()
    if on in _TARGETS:
        return on
    raise BackendError(
        f"backend 'pallas' needs a TPU or GPU, but the default JAX platform is {on!r}; use 'xla' "
        "(or 'auto') here, or 'interpret' to run the TPU kernel through the interpreter"
    )


def _module(target: str):
    """The kernel family's module, imported when first used (its Pallas backend loads then)."""
    if target == "tpu":
        from moela.kernels import flash_tpu

        return flash_tpu
    if target == "gpu":
        from moela.kernels import flash_gpu

        return flash_gpu
    raise ValueError(f"unknown flash-attention target {target!r}; valid: {', '.join(_TARGETS)}")


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention(q, k, v, q_seg, kv_seg, scale, causal, target, interpret, blocks):
    return _module(target).forward(
        q, k, v, q_seg, kv_seg, scale=scale, causal=causal, interpret=interpret, blocks=blocks
    )


def _fwd(q, k, v, q_seg, kv_seg, scale, causal, target, interpret, blocks):
    out, lse = _attention(q, k, v, q_seg, kv_seg, scale, causal, target, interpret, blocks)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _bwd(scale, causal, target, interpret, blocks, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    grads = _module(target).backward(
        q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, scale=scale, causal=causal, interpret=interpret, blocks=blocks
    )
    return grads + (None, None)


_attention.defvjp(_fwd, _bwd)


def attention(
    q_bthk,
    k_bsgk,
    v_bsgv,
    *,
    scale: float,
    causal: bool = True,
    q_segment_ids=None,
    kv_segment_ids=None,
    target: str | None = None,
    interpret: bool = False,
    blocks=None,
):
    """(out [B, T, H, V] in q's dtype, lse [B, H, T]); ``target`` None = the default platform's;
    ``blocks`` the target module's ``BlockSizes`` (None: its defaults)."""
    target = target or platform_target()
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    return _attention(
        q_bthk,
        k_bsgk,
        v_bsgv,
        q_segment_ids,
        kv_segment_ids,
        float(scale),
        bool(causal),
        target,
        bool(interpret),
        blocks,
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
    target: str | None = None,
    interpret: bool = False,
    blocks=None,
):
    """(dq, dk, dv) of one attention block given the whole attention's out and lse; see ``kernels.attention_bwd``."""
    target = target or platform_target()
    return _module(target).backward(
        q_bthk,
        k_bsgk,
        v_bsgv,
        q_segment_ids,
        kv_segment_ids,
        out_bthv,
        lse_bht,
        d_out_bthv,
        d_lse_bht,
        scale=float(scale),
        causal=bool(causal),
        interpret=bool(interpret),
        blocks=blocks,
    )


pallas = attention
interpret_tpu = partial(attention, target="tpu", interpret=True)
interpret_gpu = partial(attention, target="gpu", interpret=True)
pallas_bwd = attention_bwd
interpret_tpu_bwd = partial(attention_bwd, target="tpu", interpret=True)
interpret_gpu_bwd = partial(attention_bwd, target="gpu", interpret=True)
