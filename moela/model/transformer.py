"""The decoder: embedding, a stack of dense blocks, a stack of MoE blocks, final norm, LM head.

One forward serves training, scoring and serving. Training and scoring run whole (packed)
sequences (``__call__``, ``features``); a serving step runs a packed ragged batch against the
paged cache (``serve_step``); both go through the same ``Block``\\s, whose attention writes and
reads the cache when it is given one.

Layers of one kind are created stacked (``nnx.vmap``: every parameter gains a leading
``layers`` axis) and run with one ``jax.lax.scan``, so compile time does not grow with depth;
``runtime.remat`` picks the rematerialisation policy of the scanned body. Serving reads each
layer's weights once per step and is bound by that, so it runs the same model in its *serving
layout* (``to_serving_layout``): one block per layer, unrolled, each reading its own buffers in
place (a scan's per-layer slice copies the layer's weights first: at batch 1 on the ``bench``
preset, copying the 16 experts of each layer, of which a token uses 2, took 22 of a 25 ms
step), and the LM head stored as [N, D] rows (XLA's CPU matmul of a few rows against [D, N]
ran 2x slower than against [N, D]: 6.2 vs 3.3 ms for 8 rows x 32000 on the bench preset).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moela.configs.schema import ModelConfig
from moela.model.block import REMAT_POLICIES, RESIDUAL, Block, run_blocks, stacked_blocks
from moela.model.cache import PagedCache
from moela.model.layers import Embed, LMHead, RMSNorm
from moela.model.mtp import mtp_modules
from moela.model.rope import Rotary
from moela.model.runtime import Runtime

__all__ = ["REMAT_POLICIES", "Block", "Decoder", "abstract_model", "init_model", "to_serving_layout"]


class Decoder(nnx.Module):
    """tokens [B, T] -> (logits [B, T, N] float32, aux); see the module docstring.

    ``positions`` default to 0..T-1 per row; with packed sequences pass positions that
    restart per document and ``segment_ids`` (0 marks padding; attention never crosses a
    segment). ``aux`` holds ``expert_load`` [L_moe, E], the summed ``aux_loss`` and
    ``moe_dropped_pairs`` (pairs an expert-parallel capacity dropped, summed over layers).

    The residual stream is constrained to x[batch, length, act_embed] at every block boundary
    (``rt.partitioner``); when the partitioner lays the sequence out in another order (ring
    attention's zig-zag) the tokens are permuted on the way in and the hidden states restored on
    the way out, so callers never see the permutation.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, serving_layout: bool = False):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.ctx, rngs=rngs)
        self.dense_blocks = self._blocks(False, cfg.num_dense_layers, rngs, serving_layout)
        self.moe_blocks = self._blocks(True, cfg.num_moe_layers, rngs, serving_layout)
        self.final_norm = RMSNorm(cfg.d_model, cfg.ctx, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.vocab_size, cfg.ctx, rows=serving_layout, rngs=rngs)
        self.mtp = mtp_modules(cfg, rngs)  # created last: a model without MTP draws the same weights

    def _blocks(self, moe: bool, count: int, rngs: nnx.Rngs, serving_layout: bool):
        if not count:
            return None
        if serving_layout:
            return nnx.List([Block(self.cfg, moe, rngs=rngs) for _ in range(count)])
        return stacked_blocks(self.cfg, moe, count, rngs)

    def __call__(
        self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, rt: Runtime = Runtime()
    ) -> tuple[jax.Array, dict[str, Any]]:
        x_btd, aux = self.features(tokens_bt, positions_bt, segment_ids_bt, rt=rt)
        return self.logits(x_btd), aux

    def logits(self, x_btd):
        """The LM head: float32 logits [..., N] of final-normed hidden states [..., D]."""
        return self.embed.attend(x_btd) if self.lm_head is None else self.lm_head(x_btd)

    def output_weight(self) -> tuple[jax.Array, str]:
        """The output projection and its layout: (W [D, N], "dn"), or [N, D] rows ("nd": the tied
        table, or the head in the serving layout)."""
        if self.lm_head is None:
            return self.embed.table[...], "nd"
        return self.lm_head.w[...], ("nd" if self.lm_head.rows else "dn")

    def features(
        self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, rt: Runtime = Runtime()
    ) -> tuple[jax.Array, dict[str, Any]]:
        """The final-normed hidden states [B, T, D] the LM head reads, and ``aux``.

        Training feeds them to ``training.losses.head_loss`` with ``output_weight()``, which never
        forms the whole batch's logits."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        order = rt.partitioner.sequence_order(t)
        if order is not None:  # e.g. sequence parallel: the length axis laid out zig-zag once
            tokens_bt, positions_bt = tokens_bt[:, order], positions_bt[:, order]
            segment_ids_bt = None if segment_ids_bt is None else segment_ids_bt[:, order]
        x_btd, aux, _ = self._layers(tokens_bt, positions_bt, segment_ids_bt, rt, None)
        x_btd = self.final_norm(x_btd)
        if order is not None:
            x_btd = rt.constrain(x_btd[:, np.argsort(order)], RESIDUAL)
        return x_btd, aux

    def mtp_features(
        self, x_btd, tokens_bt, positions_bt=None, segment_ids_bt=None, *, rt: Runtime = Runtime()
    ) -> tuple[list[jax.Array], dict[str, Any]]:
        """The multi-token-prediction depths on a training batch (``model.mtp``): from the main
        model's final-normed hidden states x [B, T, D] (``features``) and its input tokens, each
        depth's final-normed hidden states [B, T, D] (position i of depth k scores the token k + 1
        ahead with the shared head), and ``aux`` of their MoE blocks (``expert_load`` [D, E],
        ``aux_loss``, ``moe_dropped_pairs``; empty without experts). Depth k reads the input token
        k ahead of each position (0 past the end, where its loss is masked)."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        order = rt.partitioner.sequence_order(t)
        h_btd = x_btd
        if order is not None:  # the blocks run in the partitioner's order, as the main stack does
            h_btd, positions_bt = h_btd[:, order], positions_bt[:, order]
            segment_ids_bt = None if segment_ids_bt is None else segment_ids_bt[:, order]
        cos, sin = Rotary(self.cfg.rope, self.cfg.attention.rope_dim).tables(positions_bt)
        outs, stats = [], []
        for k, module in enumerate(self.mtp, start=1):
            ahead_bt = jnp.pad(tokens_bt[:, k:], ((0, 0), (0, min(k, t))))[:, :t]
            if order is not None:
                ahead_bt = ahead_bt[:, order]
            e_btd = rt.constrain(self.embed(ahead_bt, rt=rt), RESIDUAL)
            h_btd, s = run_mtp_module(module, h_btd, e_btd, cos, sin, segment_ids_bt, rt)
            y_btd = module.final_norm(h_btd)
            outs.append(y_btd if order is None else rt.constrain(y_btd[:, np.argsort(order)], RESIDUAL))
            stats.append(s)
        if not stats[0]:
            return outs, {}
        return outs, {
            "expert_load": jnp.stack([s["load"] for s in stats]),
            "aux_loss": sum(jnp.sum(s["aux_loss"]) for s in stats),
            "moe_dropped_pairs": sum(s["dropped_pairs"] for s in stats),
        }

    def serve_step(
        self, tokens_t, positions_t, cache: PagedCache, last_index_s, *, rt: Runtime = Runtime()
    ) -> tuple[jax.Array, PagedCache]:
        """One serving step over a packed ragged batch (decode tokens, prefill chunks, whole
        prompts, one sequence after another): tokens and positions [T], the cache view of the
        step, and the packed index of each sequence's last token [S]. Returns (logits [S, N]
        float32 at those tokens, the cache with the step's rows written in every layer)."""
        x_td, cache = self.serve_hidden(tokens_t, positions_t, cache, rt=rt)
        return self.logits(x_td[last_index_s]), cache

    def serve_hidden(self, tokens_t, positions_t, cache: PagedCache, *, rt: Runtime = Runtime()):
        """``serve_step`` before the head: (final-normed hidden states [T, D] of every packed token,
        the cache). Speculative decoding scores several positions a sequence and feeds the states
        to the MTP draft."""
        real_bt = cache.real_tokens[None].astype(jnp.int32)  # padding: slot -1, routed nowhere
        x_btd, _, cache = self._layers(tokens_t[None], positions_t[None], real_bt, rt, cache)
        return self.final_norm(x_btd[0]), cache

    def mtp_serve_step(
        self, h_td, next_t, positions_t, cache: PagedCache, *, depth: int = 0, rt: Runtime = Runtime()
    ) -> tuple[jax.Array, PagedCache]:
        """MTP module ``depth`` over a packed ragged batch, its attention reading and writing cache
        layer ``num_layers + depth``: position i takes the hidden state h_i [T, D] (the model's
        final-normed state, or the module's own previous output) and the token after it, next_i [T].
        Returns (the module's output [T, D] before its final norm: ``mtp_logits`` scores the token
        after next from it, the cache)."""
        module = self.mtp[depth]
        real_bt = cache.real_tokens[None].astype(jnp.int32)
        cos, sin = Rotary(self.cfg.rope, self.cfg.attention.rope_dim).tables(positions_t[None])
        e_btd = self.embed(next_t[None], rt=rt)
        g_btd, _, cache = module(
            h_td[None], e_btd, cos, sin, real_bt, rt=rt, cache=cache, layer=self.cfg.num_layers + depth
        )
        return g_btd[0], cache

    def mtp_logits(self, g_td, depth: int = 0):
        """Float32 logits [..., N] of MTP module ``depth``'s output states (its final norm, the shared head)."""
        return self.logits(self.mtp[depth].final_norm(g_td))

    def _layers(self, tokens_bt, positions_bt, segment_ids_bt, rt: Runtime, cache: PagedCache | None):
        """Embedding and every block: (x [B, T, D] before the final norm, aux, cache)."""
        cos, sin = Rotary(self.cfg.rope, self.cfg.attention.rope_dim).tables(positions_bt)
        x_btd = rt.constrain(self.embed(tokens_bt, rt=rt), RESIDUAL)
        aux: dict[str, Any] = {"aux_loss": jnp.zeros((), jnp.float32)}
        if self.dense_blocks is not None:
            x_btd, _, cache = run_blocks(self.dense_blocks, x_btd, cos, sin, segment_ids_bt, rt=rt, cache=cache)
        if self.moe_blocks is not None:
            x_btd, stats, cache = run_blocks(
                self.moe_blocks,
                x_btd,
                cos,
                sin,
                segment_ids_bt,
                rt=rt,
                cache=cache,
                first_layer=self.cfg.num_dense_layers,
            )
            if stats:  # a serving step keeps none
                aux = {
                    "expert_load": stats["load"],
                    "aux_loss": jnp.sum(stats["aux_loss"]),
                    "moe_dropped_pairs": jnp.sum(stats["dropped_pairs"]),
                }
        return x_btd, aux, cache


def run_mtp_module(module, h_btd, e_btd, cos, sin, segment_ids_bt, rt: Runtime):
    """One MTP depth in training, rematerialised under ``runtime.remat`` as the scanned layers are."""
    graphdef, state = nnx.split(module)

    def body(state, h_btd, e_btd):
        h_btd, stats, _ = nnx.merge(graphdef, state)(h_btd, e_btd, cos, sin, segment_ids_bt, rt=rt)
        return h_btd, stats

    if rt.config.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[rt.config.remat], prevent_cse=False)
    return body(state, h_btd, e_btd)


def update_router_bias(model: Decoder, load_le, rate: float, mtp_load_de=None) -> None:
    """DeepSeek-V3's aux-loss-free balancing, after each optimiser step:
    bias_e += rate * sign(mean load - load_e), per MoE layer. ``load_le`` is [L_moe, E];
    ``mtp_load_de`` [D, E] the MTP depths' MoE blocks, when the model has them."""

    def step(bias, load):
        bias[...] = bias[...] + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)

    if model.moe_blocks is not None:
        step(model.moe_blocks.ffn.router.bias, load_le)
    if model.mtp is not None and mtp_load_de is not None:
        for module, load_e in zip(model.mtp, mtp_load_de):
            step(module.block.ffn.router.bias, load_e)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised model, built inside one jitted call (eager init is many small ops)."""
    return nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))()


def abstract_model(cfg: ModelConfig, serving_layout: bool = False) -> Decoder:
    """The model with ShapeDtypeStructs for values: shapes and metadata, nothing allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), serving_layout=serving_layout))


def to_serving_layout(model: Decoder) -> Decoder:
    """The same model in the serving layout (module docstring): layer i of each stack becomes its
    own block, and an untied LM head [D, N] becomes [N, D] rows. Done once, in one jitted call
    (sharded weights stay sharded); the result holds its own copy of the weights."""
    graphdef, target = nnx.split(abstract_model(model.cfg, serving_layout=True))

    def convert(state):
        tree = nnx.to_pure_dict(state)
        for name in ("dense_blocks", "moe_blocks"):
            if tree.get(name) is not None:
                count = jax.tree.leaves(tree[name])[0].shape[0]
                tree[name] = {i: jax.tree.map(lambda a, i=i: a[i], tree[name]) for i in range(count)}
        if tree.get("lm_head") is not None:
            tree["lm_head"] = {"w": jnp.transpose(tree["lm_head"]["w"])}
        return tree

    nnx.replace_by_pure_dict(target, jax.jit(convert)(nnx.state(model)))
    return nnx.merge(graphdef, target)
