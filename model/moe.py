"""DeepSeek Mixture-of-Experts: group-limited top-k routing, dropless grouped matmuls,
shared experts, and the statistics aux-loss-free balancing needs.

Routing (DeepSeek-V3): scores s = sigmoid(x·W_r) (or softmax, V2); experts are *selected*
on s + b, where b is a non-trainable correction bias that training nudges toward balance,
but *weighted* by the unbiased s (renormalised over the chosen k if configured, then
times ``routed_scaling_factor``). With ``n_group > 1`` only experts in the best
``topk_group`` groups are eligible.

Experts run dropless: the M = tokens·k (token, expert) pairs are sorted by expert and each
expert's rows go through its SwiGLU as a grouped matmul (``model.experts``: ``jax.lax.ragged_dot``
on TPU/GPU, a blocked scan on CPU; ``moe.impl`` chooses).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import LayerContext, MoEConfig
from model.experts import GROUPED_SWIGLU, resolve
from model.layers import SwiGLU, dtype, param


class RouterBias(nnx.Variable):
    """Selection-only expert bias (``e_score_correction_bias``); updated outside the optimiser."""


class Router(nnx.Module):
    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.w = param(rngs, (ctx.d_model, cfg.num_experts), ("embed", "expert"), ctx.init_std, ctx.param_dtype)
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=("expert",),
                               eager_sharding=False)
        self.cfg = cfg

    def __call__(self, x_md):
        """x [M, D] -> (weights [M, k] f32, expert ids [M, k] int32, scores [M, E] f32)."""
        cfg = self.cfg
        logits_me = jnp.einsum("md,de->me", x_md.astype(jnp.float32), self.w[...].astype(jnp.float32))
        scores_me = jax.nn.sigmoid(logits_me) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits_me, -1)
        choice_me = scores_me + self.bias[...]
        if cfg.n_group > 1:
            m, e = choice_me.shape
            grouped = choice_me.reshape(m, cfg.n_group, e // cfg.n_group)
            if cfg.group_score == "top2_sum":
                group_mg = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
            else:
                group_mg = jnp.max(grouped, axis=-1)
            _, best = jax.lax.top_k(group_mg, cfg.topk_group)
            keep_mg = jnp.sum(jax.nn.one_hot(best, cfg.n_group, dtype=jnp.int32), axis=1) > 0
            keep_me = jnp.repeat(keep_mg, e // cfg.n_group, axis=1)
            choice_me = jnp.where(keep_me, choice_me, -jnp.inf)
        _, ids_mk = jax.lax.top_k(choice_me, cfg.experts_per_token)
        weights_mk = jnp.take_along_axis(scores_me, ids_mk, axis=-1)
        if cfg.norm_topk_prob:
            weights_mk = weights_mk / (jnp.sum(weights_mk, axis=-1, keepdims=True) + 1e-20)
        return weights_mk * cfg.routed_scaling_factor, ids_mk.astype(jnp.int32), scores_me


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: W_gate, W_up [E, D, F], W_down [E, F, D]."""

    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        e, d, f, std, pd = cfg.num_experts, ctx.d_model, cfg.d_ff, ctx.init_std, ctx.param_dtype
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, pd)
        self.compute_dtype = dtype(ctx.compute_dtype)
        self.impl, self.block = cfg.impl, cfg.block_rows

    def __call__(self, x_md, weights_mk, ids_mk):
        """Dropless: every (token, expert) pair is computed. Returns y [M, D]."""
        cd = self.compute_dtype
        m, k = ids_mk.shape
        e = self.w_gate.shape[0]
        flat_ids = ids_mk.reshape(-1)
        order = jnp.argsort(flat_ids, stable=True)
        rows = order // k  # token of each sorted pair
        group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)
        x_sorted = jnp.take(x_md.astype(cd), rows, axis=0)
        grouped = GROUPED_SWIGLU[resolve(self.impl)]
        y_sorted = grouped(x_sorted, self.w_gate[...].astype(cd), self.w_up[...].astype(cd),
                           self.w_down[...].astype(cd), group_sizes, self.block)
        y_sorted = y_sorted * jnp.take(weights_mk.reshape(-1), order)[:, None].astype(cd)
        y_md = jnp.zeros((m, y_sorted.shape[-1]), cd).at[rows].add(y_sorted)
        return y_md


class MoE(nnx.Module):
    """Routed experts + shared experts. Returns (y [B, T, D], stats) where stats holds
    ``load`` [E] (tokens routed to each expert, padding excluded) and ``aux_loss``."""

    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.router = Router(cfg, ctx, rngs=rngs)
        self.experts = RoutedExperts(cfg, ctx, rngs=rngs)
        self.shared = SwiGLU(cfg.num_shared_experts * cfg.d_ff, ctx, rngs=rngs) if cfg.num_shared_experts else None
        self.cfg = cfg

    def __call__(self, x_btd, segment_ids_bt=None):
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)
        weights_mk, ids_mk, scores_me = self.router(x_md)
        valid_m = (jnp.ones((b * t,), bool) if segment_ids_bt is None else (segment_ids_bt.reshape(-1) != 0))
        # Padding rows still flow through the experts (shapes stay static) but weigh nothing.
        weights_mk = jnp.where(valid_m[:, None], weights_mk, 0.0)
        y_md = self.experts(x_md, weights_mk, ids_mk)
        load_e = jnp.sum(jax.nn.one_hot(ids_mk, self.cfg.num_experts, dtype=jnp.float32) * valid_m[:, None, None],
                         axis=(0, 1))
        y_btd = y_md.reshape(b, t, d).astype(x_btd.dtype)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd).astype(x_btd.dtype)
        stats = {"load": load_e, "aux_loss": self.sequence_aux_loss(scores_me, ids_mk, valid_m, b, t)}
        return y_btd, stats

    def sequence_aux_loss(self, scores_me, ids_mk, valid_m, b, t):
        """DeepSeek-V3's sequence-wise balance loss: alpha · sum_i f_i · P_i per sequence, averaged
        over the rows that hold any token.

        f_i = E/(k·T) · #(tokens of the sequence routed to i); P_i = mean_t s_i,t / sum_j s_j,t, with
        T the row's non-padding tokens. A "sequence" is a batch row: documents packed into one row
        share its statistics (cheap and static-shaped; the balance target is the same).
        """
        cfg = self.cfg
        if cfg.seq_aux_loss_coef == 0:
            return jnp.zeros((), jnp.float32)
        e, k = cfg.num_experts, cfg.experts_per_token
        valid_bt = valid_m.reshape(b, t).astype(jnp.float32)
        n_valid_b = jnp.maximum(jnp.sum(valid_bt, axis=1), 1.0)
        counts_bte = jnp.sum(jax.nn.one_hot(ids_mk, e, dtype=jnp.float32), axis=1).reshape(b, t, e)
        f_be = e / k * jnp.sum(counts_bte * valid_bt[..., None], axis=1) / n_valid_b[:, None]
        probs_bte = (scores_me / jnp.sum(scores_me, axis=-1, keepdims=True)).reshape(b, t, e)
        p_be = jnp.sum(probs_bte * valid_bt[..., None], axis=1) / n_valid_b[:, None]
        has_tokens_b = (jnp.sum(valid_bt, axis=1) > 0).astype(jnp.float32)  # all-padding rows do not count
        per_row = jnp.sum(f_be * p_be, axis=-1) * has_tokens_b
        return cfg.seq_aux_loss_coef * jnp.sum(per_row) / jnp.maximum(jnp.sum(has_tokens_b), 1.0)
