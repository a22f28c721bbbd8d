"""Self-attention layers: Multi-head Latent Attention (DeepSeek-V2/V3) and GQA/MQA.

Both take the residual stream x [B, T, D], rotary tables cos/sin [B, T, P/2] and optional
segment ids [B, T], and return (out [B, T, D], cache). One module serves every mode:

* training and scoring (``cache=None``): causal attention over the T tokens, segment ids keeping
  packed documents apart; the softmax(QK^T)V part is the partitioner's (``Runtime``): the kernel
  backend ``runtime.attention`` on one device, per shard or as ring attention on a mesh.
* serving (a ``PagedCache``): x is one step's packed tokens (B = 1, sequence after sequence); the
  layer writes each token's cache row into its page, then attends over each sequence's whole
  cache through ``kernels.paged`` (backend ``runtime.paged_attention``).

Choose a kind with ``ATTENTION``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import AttentionConfig, LayerContext, RopeConfig
from moela.kernels.paged import RowFormat
from moela.model.cache import PagedCache
from moela.model.layers import RMSNorm, dtype, param, project
from moela.model.rope import Rotary, softmax_scale
from moela.model.runtime import Runtime


class MLA(nnx.Module):
    """Multi-head Latent Attention.

    Queries come from x directly (``q_lora_rank=0``) or through a normalised rank-Q
    bottleneck. Keys and values come from one normalised latent c_kv [B, T, R] (up-projected
    per head: W_UK to nope-K, W_UV to V) plus one roped key k_pe [B, T, P] shared by all
    heads. qk head dim K = nope + P; the value head dim V is separate.

    Serving runs *absorbed* (DeepSeek-V2 §2.1.2): the cache holds only ``[c_kv | k_pe]`` per
    token; queries are mapped into latent space, q_lat = q_nope · W_UK (per head), attention runs
    as MQA over the latent rows with keys [c_kv | k_pe] and values c_kv, and the per-head latent
    output leaves through W_UV. Since q_nope·(W_UKᵀ c) = (q_nope·W_UK)·c and the softmax weights
    are the same, this equals the expanded computation, but a step reads (R + P) values per
    cached token instead of H·(K + V).
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
        """(normalised c_kv [B, T, R], roped k_pe [B, T, P]): the per-token cache row."""
        c_btr = self.kv_norm(project(x_btd, self._w(self.wkv_a)))
        k_pe_btp = Rotary.apply(project(x_btd, self._w(self.wk_pe)), cos, sin)
        return c_btr, k_pe_btp

    def __call__(
        self, x_btd, cos, sin, segment_ids_bt=None, *, rt: Runtime = Runtime(), cache: PagedCache | None = None, layer=0
    ):
        x_btd = x_btd.astype(self.compute_dtype)
        q_nope, q_pe = self.queries(x_btd, cos, sin)
        c_btr, k_pe_btp = self.latent(x_btd, cos, sin)
        if cache is not None:
            return self._absorbed(q_nope[0], q_pe[0], c_btr[0], k_pe_btp[0], rt, cache, layer)
        k_nope_bthk = project(c_btr, self._w(self.w_uk))
        v_bthv = project(c_btr, self._w(self.w_uv))
        h = self.cfg.num_heads
        k_pe_bthp = jnp.broadcast_to(k_pe_btp[:, :, None, :], k_pe_btp.shape[:2] + (h, k_pe_btp.shape[-1]))
        q_bthk = jnp.concatenate([q_nope, q_pe], axis=-1)
        k_bthk = jnp.concatenate([k_nope_bthk, k_pe_bthp], axis=-1)
        out_bthv = rt.partitioner.attention(
            q_bthk, k_bthk, v_bthv, segment_ids_bt, scale=self.scale, backend=rt.config.attention, kv_heads="act_heads"
        )
        return project(out_bthv, self._w(self.wo), contract=2), None

    def _absorbed(self, q_nope_thn, q_pe_thp, c_tr, k_pe_tp, rt: Runtime, cache: PagedCache, layer):
        """Attention over the paged latent cache for one step's packed tokens; (out [1, T, D], cache)."""
        cache = cache.write(jnp.concatenate([c_tr, k_pe_tp], axis=-1)[:, None, :], layer)
        q_lat_thr = jnp.einsum("thn,rhn->thr", q_nope_thn, self._w(self.w_uk))
        q_thw = jnp.concatenate([q_lat_thr, q_pe_thp.astype(q_lat_thr.dtype)], axis=-1)
        fmt = RowFormat.mla(self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
        out_thr = rt.partitioner.paged_attention(
            q_thw, cache, layer, scale=self.scale, fmt=fmt, backend=rt.config.paged_attention
        )
        out_thv = jnp.einsum("thr,rhv->thv", out_thr.astype(q_lat_thr.dtype), self._w(self.w_uv))
        return project(out_thv, self._w(self.wo), contract=2)[None], cache


class GQA(nnx.Module):
    """Grouped-query attention (G kv heads shared by H/G query heads each; G=1 is MQA),
    rope over the whole head dim. For ablations against MLA. Its cache rows are [k | v] per kv head."""

    def __init__(self, cfg: AttentionConfig, rope: RopeConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, h, g, k, std, pd = ctx.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ctx.init_std, ctx.param_dtype
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "qk"), std, pd)
        self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "qk"), std, pd)
        self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "v"), std, pd)
        self.wo = param(rngs, (h, k, d), ("heads", "v", "embed"), std, pd)
        self.cfg = cfg
        self.scale = softmax_scale(rope, k)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def __call__(
        self, x_btd, cos, sin, segment_ids_bt=None, *, rt: Runtime = Runtime(), cache: PagedCache | None = None, layer=0
    ):
        cd = self.compute_dtype
        x_btd = x_btd.astype(cd)
        q_bthk = Rotary.apply(project(x_btd, self.wq[...].astype(cd)), cos, sin)
        k_btgk = Rotary.apply(project(x_btd, self.wk[...].astype(cd)), cos, sin)
        v_btgk = project(x_btd, self.wv[...].astype(cd))
        if cache is not None:
            cache = cache.write(jnp.concatenate([k_btgk[0], v_btgk[0]], axis=-1), layer)
            out_thk = rt.partitioner.paged_attention(
                q_bthk[0],
                cache,
                layer,
                scale=self.scale,
                fmt=RowFormat.gqa(self.cfg.head_dim),
                backend=rt.config.paged_attention,
            )
            return project(out_thk.astype(cd), self.wo[...].astype(cd), contract=2)[None], cache
        out_bthk = rt.partitioner.attention(
            q_bthk,
            k_btgk,
            v_btgk,
            segment_ids_bt,
            scale=self.scale,
            backend=rt.config.attention,
            kv_heads="act_kv_heads",
        )
        return project(out_bthk, self.wo[...].astype(cd), contract=2), None


ATTENTION = {"mla": MLA, "gqa": GQA}
