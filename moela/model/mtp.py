"""Multi-token prediction (MTP) modules, as in the DeepSeek-V3 report (arXiv:2412.19437, sec. 2.2).

``model.mtp_depth`` = D modules run after the main model, one after another. Module k (1..D)
predicts, at position i, the token k + 1 ahead (t_{i+k+1}) from two inputs: the previous depth's
hidden state h^{k-1}_i and the embedding of the token k ahead, t_{i+k} (known at training time;
while decoding, the token the previous depth predicted):

    u_i = W_proj · [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)]        W_proj [2D -> D]
    h^k = Block_k(u)                 one decoder block (MLA + MoE when the model has experts)
    P^k_{i+k+1} = softmax(OutHead(RMSNorm_f(h^k_i)))

The embedding table and the output head are the main model's (shared, not copied); each module
has its own three norms, projection and block. h^0 is the main model's final-normed hidden state
(what its head reads), and h^k (k >= 1) the module's block output before its own final norm: the
convention of the released DeepSeek-V3 weights as vLLM and SGLang serve them, whose concatenation
puts the embedding first (``eh_proj`` over [enorm(emb); hnorm(h)]).

Training adds ``train.mtp_loss_weight`` x the mean over depths of each depth's cross-entropy
(``training.losses.mtp_targets`` masks the positions whose token k + 1 ahead leaves the sequence
or the document); serving uses the modules as a speculative draft.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import ModelConfig
from moela.model.block import RESIDUAL, Block
from moela.model.cache import PagedCache
from moela.model.layers import RMSNorm, dtype, param, project
from moela.model.runtime import Runtime


class MTPModule(nnx.Module):
    """One depth: (h^{k-1} [B, T, D], Emb(t_{+k}) [B, T, D]) -> (h^k [B, T, D] before the final norm,
    MoE stats, cache). ``final_norm`` is applied by the caller before the shared head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        ctx, d = cfg.ctx, cfg.d_model
        self.embed_norm = RMSNorm(d, ctx, rngs=rngs)
        self.hidden_norm = RMSNorm(d, ctx, rngs=rngs)
        # [embedding; hidden] -> D. The concatenated input has no logical name: it is replicated
        # (2·D² parameters a depth); its output dim is the residual stream's ``embed``.
        self.proj = param(rngs, (2 * d, d), (None, "embed"), ctx.init_std, ctx.param_dtype)
        self.block = Block(cfg, moe=cfg.num_moe_layers > 0, rngs=rngs)
        self.final_norm = RMSNorm(d, ctx, rngs=rngs)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def __call__(
        self,
        h_btd,
        e_btd,
        cos,
        sin,
        segment_ids_bt,
        *,
        rt: Runtime = Runtime(),
        cache: PagedCache | None = None,
        layer: int = 0,
    ):
        cd = self.compute_dtype
        u_btd = jnp.concatenate([self.embed_norm(e_btd).astype(cd), self.hidden_norm(h_btd).astype(cd)], axis=-1)
        x_btd = rt.constrain(project(u_btd, self.proj[...].astype(cd)), RESIDUAL)
        return self.block(x_btd, cos, sin, segment_ids_bt, rt=rt, cache=cache, layer=layer)


def mtp_modules(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List | None:
    """The ``model.mtp_depth`` modules (None when 0), unrolled: a depth runs once per step."""
    return nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)]) if cfg.mtp_depth else None
