"""The ``xla`` attention backend: plain XLA ops with a hand-written backward pass.

Same semantics as ``kernels.reference`` (causal with offset, segment ids, GQA, Dqk != Dv,
float32 softmax), but the gradient is the flash-attention one: the forward saves only
q, k, v, the output and the log-sum-exp; the backward recomputes the probabilities as
exp(s - lse) in one pass and forms

    dv = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP - rowsum(dO ⊙ O) + dlse)    dq = dS·K·scale    dk = dSᵀ·Q·scale

Autodiff of the reference instead keeps every [B, H, T, S] intermediate of the masked
softmax and walks back through each of them; on CPU those elementwise passes, not the
matmuls, were most of the attention time. Memory is O(T) per row instead of O(T·S) saved
tensors. This is the CPU path of ``auto`` and the fallback where no Pallas kernel applies.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from kernels.reference import NEG_INF, attention_mask


def _logits(q_btgrk, k_bsgk, scale, mask):
    s = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, NEG_INF)


def _forward(q, k, v, q_seg, kv_seg, scale, causal):
    b, t, h, _ = q.shape
    s_len, g = k.shape[1], k.shape[2]
    q5 = q.astype(jnp.float32).reshape(b, t, g, h // g, -1)
    mask = attention_mask(t, s_len, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)[:, None, None]
    s = _logits(q5, k.astype(jnp.float32), scale, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bgrts,bsgv->btgrv", p, v.astype(jnp.float32)) / jnp.moveaxis(safe, -2, 1)
    lse = jnp.where(denom[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(safe[..., 0]))  # [b, g, r, t]
    return out, lse, mask


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_seg, kv_seg, scale, causal):
    out, lse, _ = _forward(q, k, v, q_seg, kv_seg, scale, causal)
    return _outputs(q, out, lse)


def _outputs(q, out_btgrv, lse_bgrt):
    b, t, h = q.shape[:3]
    return out_btgrv.reshape(b, t, h, -1).astype(q.dtype), lse_bgrt.reshape(b, h, t)


def _fwd(q, k, v, q_seg, kv_seg, scale, causal):
    out, lse, _ = _forward(q, k, v, q_seg, kv_seg, scale, causal)
    return _outputs(q, out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _bwd(scale, causal, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    b, t, h, _ = q.shape
    s_len, g = k.shape[1], k.shape[2]
    q5 = q.astype(jnp.float32).reshape(b, t, g, h // g, -1)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    do5 = d_out.astype(jnp.float32).reshape(out.shape)
    mask = attention_mask(t, s_len, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)[:, None, None]
    s = _logits(q5, k32, scale, mask)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    p = jnp.where(mask, jnp.exp(s - lse_safe), 0.0)  # the forward's probabilities, recomputed
    dv = jnp.einsum("bgrts,btgrv->bsgv", p, do5)
    dp = jnp.einsum("btgrv,bsgv->bgrts", do5, v32)
    delta = jnp.moveaxis(jnp.sum(do5 * out, axis=-1), 1, -1)  # rowsum(dO ⊙ O): [b, g, r, t]
    d_lse = d_lse.astype(jnp.float32).reshape(delta.shape)
    ds = p * (dp - (delta - d_lse)[..., None]) * scale
    dq = jnp.einsum("bgrts,bsgk->btgrk", ds, k32).reshape(q.shape)
    dk = jnp.einsum("bgrts,btgrk->bsgk", ds, q5)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_fwd, _bwd)


def attention(q_bthk, k_bsgk, v_bsgv, *, scale: float, causal: bool = True, q_segment_ids=None,
              kv_segment_ids=None):
    """Returns (out [B, T, H, V] in q's dtype, lse [B, H, T]); see ``kernels.reference``."""
    h, g = q_bthk.shape[2], k_bsgk.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    return _attention(q_bthk, k_bsgk, v_bsgv, q_segment_ids, kv_segment_ids, float(scale), bool(causal))
