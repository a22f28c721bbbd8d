"""The ``xla`` attention backend: plain XLA ops with a hand-written backward pass.

Same semantics as ``kernels.reference`` (causal with offset, segment ids, GQA, Dqk != Dv,
float32 softmax), but the gradient is the flash-attention one: the forward saves only
q, k, v, the output and the log-sum-exp; the backward recomputes the probabilities as
exp(s - lse) in one pass and forms

    dv = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP - rowsum(dO ⊙ O) + dlse)    dq = dS·K·scale    dk = dSᵀ·Q·scale

``attention_bwd`` exposes that backward for one block given the output and log-sum-exp of
the whole attention the block belongs to (ring attention sums the blocks' gradients).

Autodiff of the reference instead keeps every [B, H, T, S] intermediate of the masked
softmax and walks back through each of them; on CPU those elementwise passes, not the
matmuls, were most of the attention time. Memory is O(T) per row instead of O(T·S) saved
tensors. This is the CPU path of ``auto`` and the fallback where no Pallas kernel applies.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moela.kernels.common import NEG_INF


Q_BLOCK = 128  # causal attention runs in query blocks of this many rows, each over the keys it can see


def _blocks(t: int, s: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) per query block. Under the causal mask (queries are
    the last t of s positions) block [a, e) sees keys [0, e + s - t) only, so the keys after
    that are never multiplied: about half the QK and PV work at long lengths."""
    if not causal or t <= Q_BLOCK:
        return [(0, t, s)]
    return [(a, min(a + Q_BLOCK, t), min(a + Q_BLOCK, t) + s - t) for a in range(0, t, Q_BLOCK)]


def _mask(a, e, ke, t, s, causal, q_seg, kv_seg):
    """Boolean [B or 1, 1, 1, e - a, ke]: query rows a..e-1 against keys 0..ke-1."""
    mask = jnp.ones((1, e - a, ke), dtype=bool)
    if causal:
        mask = mask & ((jnp.arange(a, e)[:, None] + (s - t)) >= jnp.arange(ke)[None, :])[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, a:e, None] == kv_seg[:, None, :ke])
    return mask[:, None, None]


def _logits(q_bgrtk, k_bgsk, scale, mask):
    s = jnp.einsum("bgrtk,bgsk->bgrts", q_bgrtk, k_bgsk, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s, NEG_INF)


def _head_major(q, k, v):
    """q [B,T,H,K] -> [B,G,R,T,K], k/v [B,S,G,*] -> [B,G,S,*], float32. In this layout every
    contraction below is a plain batched matmul over (B, G), so XLA inserts no transposes of
    the [.., T, S] tensors."""
    b, t, h, _ = q.shape
    g = k.shape[2]
    q5 = q.astype(jnp.float32).reshape(b, t, g, h // g, -1).transpose(0, 2, 3, 1, 4)
    return q5, k.astype(jnp.float32).transpose(0, 2, 1, 3), v.astype(jnp.float32).transpose(0, 2, 1, 3)


def _forward(q, k, v, q_seg, kv_seg, scale, causal):
    """(out [B, G, R, T, V], lse [B, G, R, T]), float32."""
    t, s_len = q.shape[1], k.shape[1]
    qh, kh, vh = _head_major(q, k, v)
    outs, lses = [], []
    for a, e, ke in _blocks(t, s_len, causal):
        mask = _mask(a, e, ke, t, s_len, causal, q_seg, kv_seg)
        s = _logits(qh[:, :, :, a:e], kh[:, :, :ke], scale, mask)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.where(mask, jnp.exp(s - m), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        safe = jnp.where(denom == 0, 1.0, denom)
        outs.append(jnp.einsum("bgrts,bgsv->bgrtv", p, vh[:, :, :ke]) / safe)
        lses.append(jnp.where(denom[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(safe[..., 0])))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=-1)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_seg, kv_seg, scale, causal):
    return _outputs(q, *_forward(q, k, v, q_seg, kv_seg, scale, causal))


def _outputs(q, out_bgrtv, lse_bgrt):
    b, t, h = q.shape[:3]
    out = out_bgrtv.transpose(0, 3, 1, 2, 4).reshape(b, t, h, -1)
    return out.astype(q.dtype), lse_bgrt.reshape(b, h, t)


def _fwd(q, k, v, q_seg, kv_seg, scale, causal):
    out, lse = _forward(q, k, v, q_seg, kv_seg, scale, causal)
    return _outputs(q, out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _gradients(qh, kh, vh, do, out, lse, d_lse, q_seg, kv_seg, scale, causal):
    """The flash backward in head-major float32: qh [B,G,R,T,K], kh [B,G,S,K], vh [B,G,S,V],
    do/out [B,G,R,T,V], lse/d_lse [B,G,R,T] -> (dq [B,G,R,T,K], dk [B,G,S,K], dv [B,G,S,V]).

    ``out`` and ``lse`` may be those of a larger attention this block is part of (ring
    attention): P = exp(s - lse) is then this block's share of the global softmax, and the
    gradients are this block's exact contribution. Rows with lse -inf contribute nothing."""
    t, s_len = qh.shape[3], kh.shape[2]
    delta = jnp.sum(do * out, axis=-1)  # rowsum(dO ⊙ O): [b, g, r, t]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # exp(s - inf) = 0: invisible rows give P = 0
    dqs, dk, dv = [], jnp.zeros_like(kh), jnp.zeros_like(vh)
    for a, e, ke in _blocks(t, s_len, causal):
        mask = _mask(a, e, ke, t, s_len, causal, q_seg, kv_seg)
        q_blk, do_blk = qh[:, :, :, a:e], do[:, :, :, a:e]
        s = _logits(q_blk, kh[:, :, :ke], scale, mask)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., a:e, None]), 0.0)  # the forward's probabilities
        dv = dv.at[:, :, :ke].add(jnp.einsum("bgrts,bgrtv->bgsv", p, do_blk))
        dp = jnp.einsum("bgrtv,bgsv->bgrts", do_blk, vh[:, :, :ke])
        ds = p * (dp - (delta[..., a:e] - d_lse[..., a:e])[..., None]) * scale
        dqs.append(jnp.einsum("bgrts,bgsk->bgrtk", ds, kh[:, :, :ke]))
        dk = dk.at[:, :, :ke].add(jnp.einsum("bgrts,bgrtk->bgsk", ds, q_blk))
    return jnp.concatenate(dqs, axis=3), dk, dv


def _public_grads(q, k, v, dq, dk, dv):
    """Head-major float32 gradients back to the callers' layouts and dtypes."""
    return (
        dq.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype),
        dk.transpose(0, 2, 1, 3).astype(k.dtype),
        dv.transpose(0, 2, 1, 3).astype(v.dtype),
    )


def _split_heads(x_bthv, g):
    """[B, T, H, V] -> float32 [B, G, R, T, V], the head-major layout of ``_head_major``'s q."""
    b, t, h, _ = x_bthv.shape
    return x_bthv.astype(jnp.float32).reshape(b, t, g, h // g, -1).transpose(0, 2, 3, 1, 4)


def _bwd(scale, causal, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    qh, kh, vh = _head_major(q, k, v)
    d_lse = d_lse.astype(jnp.float32).reshape(lse.shape)
    grads = _gradients(qh, kh, vh, _split_heads(d_out, k.shape[2]), out, lse, d_lse, q_seg, kv_seg, scale, causal)
    return _public_grads(q, k, v, *grads) + (None, None)


_attention.defvjp(_fwd, _bwd)


def attention(q_bthk, k_bsgk, v_bsgv, *, scale: float, causal: bool = True, q_segment_ids=None, kv_segment_ids=None):
    """Returns (out [B, T, H, V] in q's dtype, lse [B, H, T]); see ``kernels.reference``."""
    h, g = q_bthk.shape[2], k_bsgk.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    return _attention(q_bthk, k_bsgk, v_bsgv, q_segment_ids, kv_segment_ids, float(scale), bool(causal))


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
):
    """(dq, dk, dv) of one attention block in the inputs' dtypes; see ``kernels.attention_bwd``."""
    h, g = q_bthk.shape[2], k_bsgk.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    b, t = q_bthk.shape[:2]
    lse = lse_bht.astype(jnp.float32).reshape(b, g, h // g, t)
    d_lse = jnp.zeros_like(lse) if d_lse_bht is None else d_lse_bht.astype(jnp.float32).reshape(lse.shape)
    qh, kh, vh = _head_major(q_bthk, k_bsgk, v_bsgv)
    grads = _gradients(
        qh,
        kh,
        vh,
        _split_heads(d_out_bthv, g),
        _split_heads(out_bthv, g),
        lse,
        d_lse,
        q_segment_ids,
        kv_segment_ids,
        float(scale),
        bool(causal),
    )
    return _public_grads(q_bthk, k_bsgk, v_bsgv, *grads)
