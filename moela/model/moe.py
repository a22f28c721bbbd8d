"""DeepSeek Mixture-of-Experts: group-limited top-k routing, dropless routed experts, shared
experts, and the statistics aux-loss-free balancing needs.

Routing (DeepSeek-V3): scores s = sigmoid(x·W_r) (or softmax, V2); experts are *selected*
on s + b, where b is a non-trainable correction bias that training nudges toward balance,
but *weighted* by the unbiased s (renormalised over the chosen k if configured, then
times ``routed_scaling_factor``). With ``n_group > 1`` only experts in the best
``topk_group`` groups are eligible.

The routed experts run dropless. In training every (token, expert) pair goes through the grouped
matmul (``kernels.grouped.routed_swiglu``; backend ``runtime.grouped_matmul``), or, when the
partitioner splits experts over devices, through its expert-parallel island (whose ``all_to_all``
dispatch with ``runtime.expert_capacity`` > 0 may drop pairs: the count is a statistic). A serving step
(``inference=True``: a few hundred packed tokens at most) picks at run time between the grouped
matmul with blocks sized to the step and, when its tokens touch most experts with few pairs
each, every expert on a fixed number of its own rows (``kernels.grouped.capacity_swiglu``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import LayerContext, MoEConfig
from moela.kernels import grouped
from moela.model.layers import SwiGLU, dtype, param, project
from moela.model.runtime import Runtime

CAPACITY_PAIRS_PER_EXPERT = 16  # above T·k = 16·E the grouped matmul's blocks are full enough


class RouterBias(nnx.Variable):
    """Selection-only expert bias (``e_score_correction_bias``); updated outside the optimiser."""


class Router(nnx.Module):
    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.w = param(rngs, (ctx.d_model, cfg.num_experts), ("embed", "expert"), ctx.init_std, ctx.param_dtype)
        self.bias = RouterBias(
            jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=("expert",), eager_sharding=False
        )
        self.cfg = cfg

    def __call__(self, x_td):
        """x [..., D] -> (weights [..., k] f32, expert ids [..., k] int32, scores [..., E] f32).

        Any leading token dims: the MoE keeps [B, T] so a (data, sequence)-sharded batch is
        routed where it lies (flattening B·T would regroup rows across devices)."""
        cfg = self.cfg
        logits_te = project(x_td.astype(jnp.float32), self.w[...].astype(jnp.float32))
        scores_te = jax.nn.sigmoid(logits_te) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits_te, -1)
        choice_te = scores_te + self.bias[...]
        if cfg.n_group > 1:
            e = choice_te.shape[-1]
            grouped_scores = choice_te.reshape(choice_te.shape[:-1] + (cfg.n_group, e // cfg.n_group))
            if cfg.group_score == "top2_sum":
                group_tg = jnp.sum(jax.lax.top_k(grouped_scores, 2)[0], axis=-1)
            else:
                group_tg = jnp.max(grouped_scores, axis=-1)
            _, best = jax.lax.top_k(group_tg, cfg.topk_group)
            keep_tg = jnp.sum(jax.nn.one_hot(best, cfg.n_group, dtype=jnp.int32), axis=-2) > 0
            keep_te = jnp.repeat(keep_tg, e // cfg.n_group, axis=-1)
            choice_te = jnp.where(keep_te, choice_te, -jnp.inf)
        _, ids_tk = jax.lax.top_k(choice_te, cfg.experts_per_token)
        weights_tk = jnp.take_along_axis(scores_te, ids_tk, axis=-1)
        if cfg.norm_topk_prob:
            weights_tk = weights_tk / (jnp.sum(weights_tk, axis=-1, keepdims=True) + 1e-20)
        return weights_tk * cfg.routed_scaling_factor, ids_tk.astype(jnp.int32), scores_te


def step_block_rows(tokens: int, cfg: MoEConfig) -> int:
    """Rows per block of the grouped matmul in a serving step of ``tokens`` tokens: about one
    block per expert's expected share (T·k/E rows), a power of two in [8, 128]. Training's 128
    would make a 64-token step compute 17 blocks of 128 rows per layer, mostly padding."""
    share = max(tokens * cfg.experts_per_token // cfg.num_experts, 1)
    return min(128, max(8, 1 << (share - 1).bit_length()))


def capacity_pays(real_tokens, cfg: MoEConfig):
    """Should a serving step run every expert on its own rows? When its real tokens are expected to
    touch at least half the experts (uniform routing: E·(1 - (1 - k/E)^n)) and bring at most
    ``CAPACITY_PAIRS_PER_EXPERT`` pairs per expert. Decided at run time from the count of real
    tokens (padding does not count), so one compiled shape serves batch 1 (grouped: 2 of 16
    experts read on the bench preset, 14 ms a step against 30 with every expert) and batch 8."""
    e, k = cfg.num_experts, cfg.experts_per_token
    touched = e * (1 - (1 - k / e) ** real_tokens.astype(jnp.float32))
    return (touched >= e / 2) & (real_tokens * k <= CAPACITY_PAIRS_PER_EXPERT * e)


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: W_gate, W_up [E, D, F], W_down [E, F, D]."""

    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        e, d, f, std, pd = cfg.num_experts, ctx.d_model, cfg.d_ff, ctx.init_std, ctx.param_dtype
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, pd)
        self.w_down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, pd)
        self.compute_dtype = dtype(ctx.compute_dtype)
        self.cfg = cfg

    def weights(self):
        cd = self.compute_dtype
        return tuple(w[...].astype(cd) for w in (self.w_gate, self.w_up, self.w_down))

    def __call__(self, x_td, weights_tk, ids_tk, *, rt: Runtime = Runtime()):
        """x [..., D] -> (y [..., D], pairs dropped: int32 []). Every (token, expert) pair is computed
        unless an expert-parallel dispatch with a capacity drops some (the partitioner runs the
        experts expert-parallel when its mesh splits them)."""
        return rt.partitioner.routed_experts(
            x_td.astype(self.compute_dtype), weights_tk, ids_tk, *self.weights(), runtime=rt.config
        )

    def serve(self, x_td, weights_tk, ids_tk, real_t, *, rt: Runtime = Runtime()):
        """A serving step's tokens x [T, D] (padding: ``real_t`` False, routed nowhere) -> y [T, D]."""
        cfg, t = self.cfg, x_td.shape[0]
        ids_tk = jnp.where(real_t[:, None], ids_tk, cfg.num_experts)  # out of range: never computed
        args = (x_td.astype(self.compute_dtype), weights_tk, ids_tk, *self.weights())

        def by_groups(a):
            return grouped.routed_swiglu(*a, backend=rt.config.grouped_matmul, block=step_block_rows(t, cfg))

        if t * cfg.experts_per_token > CAPACITY_PAIRS_PER_EXPERT * cfg.num_experts:  # capacity cannot pay
            return by_groups(args)
        return jax.lax.cond(capacity_pays(jnp.sum(real_t), cfg), lambda a: grouped.capacity_swiglu(*a), by_groups, args)


class MoE(nnx.Module):
    """Routed experts + shared experts. Returns (y [B, T, D], stats) where training's stats hold
    ``load`` [E] (tokens routed to each expert, padding excluded), ``aux_loss`` and
    ``dropped_pairs`` (int32: (token, expert) pairs an expert-parallel capacity dropped, padding
    included; 0 when dropless)."""

    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.router = Router(cfg, ctx, rngs=rngs)
        self.experts = RoutedExperts(cfg, ctx, rngs=rngs)
        self.shared = SwiGLU(cfg.num_shared_experts * cfg.d_ff, ctx, rngs=rngs) if cfg.num_shared_experts else None
        self.cfg = cfg

    def __call__(self, x_btd, segment_ids_bt=None, *, rt: Runtime = Runtime(), inference: bool = False):
        """(y, stats); a serving step (``inference``: B = 1, packed tokens, padding with segment id 0)
        keeps no statistics (``{}``)."""
        weights_btk, ids_btk, scores_bte = self.router(x_btd)
        valid_bt = jnp.ones(x_btd.shape[:2], bool) if segment_ids_bt is None else segment_ids_bt != 0
        if inference:
            y_td = self.experts.serve(x_btd[0], weights_btk[0], ids_btk[0], valid_bt[0], rt=rt)
            y_btd, stats = y_td[None].astype(x_btd.dtype), {}
        else:
            # Padding rows still flow through the experts (shapes stay static) but weigh nothing.
            weights_btk = jnp.where(valid_bt[..., None], weights_btk, 0.0)
            y_btd, dropped = self.experts(x_btd, weights_btk, ids_btk, rt=rt)
            y_btd = y_btd.astype(x_btd.dtype)
            load_e = jnp.sum(
                jax.nn.one_hot(ids_btk, self.cfg.num_experts, dtype=jnp.float32) * valid_bt[..., None, None],
                axis=(0, 1, 2),
            )
            aux_loss = self.sequence_aux_loss(scores_bte, ids_btk, valid_bt)
            stats = {"load": load_e, "aux_loss": aux_loss, "dropped_pairs": dropped}
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd).astype(x_btd.dtype)
        return y_btd, stats

    def sequence_aux_loss(self, scores_bte, ids_btk, valid_bt):
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
        valid_bt = valid_bt.astype(jnp.float32)
        n_valid_b = jnp.maximum(jnp.sum(valid_bt, axis=1), 1.0)
        counts_bte = jnp.sum(jax.nn.one_hot(ids_btk, e, dtype=jnp.float32), axis=2)
        f_be = e / k * jnp.sum(counts_bte * valid_bt[..., None], axis=1) / n_valid_b[:, None]
        probs_bte = scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True)
        p_be = jnp.sum(probs_bte * valid_bt[..., None], axis=1) / n_valid_b[:, None]
        has_tokens_b = (jnp.sum(valid_bt, axis=1) > 0).astype(jnp.float32)  # all-padding rows do not count
        per_row = jnp.sum(f_be * p_be, axis=-1) * has_tokens_b
        return cfg.seq_aux_loss_coef * jnp.sum(per_row) / jnp.maximum(jnp.sum(has_tokens_b), 1.0)
