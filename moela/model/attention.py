"""Self-attention layers: Multi-head Latent Attention (DeepSeek-V2/V3) and GQA/MQA.

Both take the residual stream x [B, T, D], rotary tables cos/sin [B, T, P/2] and optional
segment ids [B, T], and call ``parallel.ring.sharded_attention`` for the softmax(QK^T)V part:
``kernels.attention`` (backend from ``attention.impl``) on one device or under GSPMD, ring
attention when the current layout splits the length axis over ``sequence``. Choose a kind
with ``ATTENTION``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import AttentionConfig, LayerContext, RopeConfig
from moela.model.layers import RMSNorm, dtype, param, project
from moela.model.rope import Rotary, softmax_scale
from moela.parallel.ring import sharded_attention


class MLA(nnx.Module):
    """Multi-head Latent Attention.

    Queries come from x directly (``q_lora_rank=0``) or through a normalised rank-Q
    bottleneck. Keys and values come from one normalised latent c_kv [B, T, R] (up-projected
    per head: W_UK to nope-K, W_UV to V) plus one roped key k_pe [B, T, P] shared by all
    heads. qk head dim K = nope + P; the value head dim V is separate. The latent and k_pe are
    what a decode cache stores (``latent``), and ``w_uk``/``w_uv`` are what absorbed decode
    folds into the query and output.
    """

    def __init__(self, cfg: AttentionConfig, rope: RopeConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, h, std, pd = ctx.d_model, cfg.num_heads, ctx.init_std, ctx.param_dtype
        k, nope, p, r, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), std, pd)
            self.q_norm = RMSNorm(cfg.q_lora_rank, ctx, axis_name="q_lora", rngs=rngs)
            self.wq_b = param(rngs, (cfg.q_lora_rank, h, k), ("q_lora", "heads", "qk"), std, pd)
        else:
            self.wq = param(rngs, (d, h, k), ("embed", "heads", "qk"), std, pd)
        self.wkv_a = param(rngs, (d, r), ("embed", "kv_lora"), std, pd)
        self.wk_pe = param(rngs, (d, p), ("embed", "rope"), std, pd)
        self.kv_norm = RMSNorm(r, ctx, axis_name="kv_lora", rngs=rngs)
        self.w_uk = param(rngs, (r, h, nope), ("kv_lora", "heads", "qk"), std, pd)
        self.w_uv = param(rngs, (r, h, v), ("kv_lora", "heads", "v"), std, pd)
        self.wo = param(rngs, (h, v, d), ("heads", "v", "embed"), std, pd)
        self.cfg = cfg
        self.scale = softmax_scale(rope, k)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def _w(self, p):
        return p[...].astype(self.compute_dtype)

    def queries(self, x_btd, cos, sin):
        """(q_nope [B, T, H, nope], roped q_pe [B, T, H, P])."""
        if self.cfg.q_lora_rank:
            c_btq = self.q_norm(project(x_btd, self._w(self.wq_a)))
            q_bthk = project(c_btq, self._w(self.wq_b))
        else:
            q_bthk = project(x_btd, self._w(self.wq))
        nope = self.cfg.qk_nope_head_dim
        return q_bthk[..., :nope], Rotary.apply(q_bthk[..., nope:], cos, sin)

    def latent(self, x_btd, cos, sin):
        """(normalised c_kv [B, T, R], roped k_pe [B, T, P]): the per-token decode cache row."""
        c_btr = self.kv_norm(project(x_btd, self._w(self.wkv_a)))
        k_pe_btp = Rotary.apply(project(x_btd, self._w(self.wk_pe)), cos, sin)
        return c_btr, k_pe_btp

    def __call__(self, x_btd, cos, sin, segment_ids_bt=None):
        x_btd = x_btd.astype(self.compute_dtype)
        q_nope, q_pe = self.queries(x_btd, cos, sin)
        c_btr, k_pe_btp = self.latent(x_btd, cos, sin)
        k_nope_bthk = project(c_btr, self._w(self.w_uk))
        v_bthv = project(c_btr, self._w(self.w_uv))
        h = self.cfg.num_heads
        k_pe_bthp = jnp.broadcast_to(k_pe_btp[:, :, None, :], k_pe_btp.shape[:2] + (h, k_pe_btp.shape[-1]))
        q_bthk = jnp.concatenate([q_nope, q_pe], axis=-1)
        k_bthk = jnp.concatenate([k_nope_bthk, k_pe_bthp], axis=-1)
        out_bthv = sharded_attention(q_bthk, k_bthk, v_bthv, segment_ids_bt, scale=self.scale, impl=self.cfg.impl,
                                     kv_heads_name="act_heads")
        return project(out_bthv, self._w(self.wo), contract=2)


class GQA(nnx.Module):
    """Grouped-query attention (G kv heads shared by H/G query heads each; G=1 is MQA),
    rope over the whole head dim. For ablations against MLA."""

    def __init__(self, cfg: AttentionConfig, rope: RopeConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, h, g, k, std, pd = ctx.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ctx.init_std, ctx.param_dtype
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "qk"), std, pd)
        self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "qk"), std, pd)
        self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "v"), std, pd)
        self.wo = param(rngs, (h, k, d), ("heads", "v", "embed"), std, pd)
        self.cfg = cfg
        self.scale = softmax_scale(rope, k)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def __call__(self, x_btd, cos, sin, segment_ids_bt=None):
        cd = self.compute_dtype
        x_btd = x_btd.astype(cd)
        q_bthk = Rotary.apply(project(x_btd, self.wq[...].astype(cd)), cos, sin)
        k_btgk = Rotary.apply(project(x_btd, self.wk[...].astype(cd)), cos, sin)
        v_btgk = project(x_btd, self.wv[...].astype(cd))
        out_bthk = sharded_attention(q_bthk, k_btgk, v_btgk, segment_ids_bt, scale=self.scale, impl=self.cfg.impl,
                                     kv_heads_name="act_kv_heads")
        return project(out_bthk, self.wo[...].astype(cd), contract=2)


ATTENTION = {"mla": MLA, "gqa": GQA}
