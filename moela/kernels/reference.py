"""Pure-jnp attention: the reference every kernel is tested against, and the ``xla`` backend.

    q [B, T, H, K]   k [B, S, G, K]   v [B, S, G, V]      H = G * (H // G)   (GQA/MQA)

Queries are the last T of S positions (causal with offset S - T). With segment ids a
query sees only keys of its own segment (packed sequences). Rows with nothing to attend
to (e.g. padding with no visible key) output zeros and log-sum-exp -inf.
"""

from __future__ import annotations

import jax.numpy as jnp

from moela.kernels.common import NEG_INF


def attention_mask(t: int, s: int, *, causal: bool, q_segment_ids=None, kv_segment_ids=None):
    """Boolean [B or 1, T, S] mask: True where query t may attend to key s."""
    mask = jnp.ones((1, t, s), dtype=bool)
    if causal:
        q_pos = jnp.arange(t)[:, None] + (s - t)
        mask = mask & (q_pos >= jnp.arange(s)[None, :])[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def attention(q_bthk, k_bsgk, v_bsgv, *, scale: float, causal: bool = True, q_segment_ids=None, kv_segment_ids=None):
    """Softmax attention in float32. Returns (out [B, T, H, V] in q's dtype, lse [B, H, T])."""
    b, t, h, _ = q_bthk.shape
    s, g = k_bsgk.shape[1], k_bsgk.shape[2]
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    q_btgrk = q_bthk.reshape(b, t, g, h // g, -1)
    logits_bgrts = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk, preferred_element_type=jnp.float32) * scale
    mask_bts = attention_mask(t, s, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    mask = mask_bts[:, None, None]
    logits_bgrts = jnp.where(mask, logits_bgrts, NEG_INF)
    m = jnp.max(logits_bgrts, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits_bgrts - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom == 0, 1.0, denom)
    out_btgrv = jnp.einsum("bgrts,bsgv->btgrv", p / safe, v_bsgv.astype(jnp.float32))
    lse_bgrt = jnp.where(denom[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(safe[..., 0]))
    return out_btgrv.reshape(b, t, h, -1).astype(q_bthk.dtype), lse_bgrt.reshape(b, h, t)
