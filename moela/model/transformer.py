"""The decoder: embedding, a scanned stack of dense blocks, a scanned stack of MoE blocks,
final norm, LM head.

Layers of one kind are created stacked (``nnx.vmap``: every parameter gains a leading
``layers`` axis) and run with one ``jax.lax.scan``, so compile time does not grow with
depth; ``model.remat`` picks the rematerialisation policy of the scanned body.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import ModelConfig
from moela.model.attention import ATTENTION
from moela.model.layers import Embed, LMHead, RMSNorm, SwiGLU
from moela.model.moe import MoE
from moela.model.rope import Rotary
from moela.parallel.layout import constrain, current
from moela.parallel.ring import inverse_permutation, zigzag_permutation

RESIDUAL = ("batch", "length", "act_embed")  # logical axes of the residual stream x [B, T, D]

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)); ffn is SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        ctx = cfg.ctx
        self.attn_norm = RMSNorm(cfg.d_model, ctx, rngs=rngs)
        self.attn = ATTENTION[cfg.attention.kind](cfg.attention, cfg.rope, ctx, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, ctx, rngs=rngs)
        self.ffn = MoE(cfg.moe, ctx, rngs=rngs) if moe else SwiGLU(cfg.d_ff, ctx, rngs=rngs)
        self.moe = moe

    def __call__(self, x_btd, cos, sin, segment_ids_bt):
        x_btd = constrain(x_btd, RESIDUAL)
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), cos, sin, segment_ids_bt).astype(x_btd.dtype)
        x_btd = constrain(x_btd, RESIDUAL)
        h_btd = self.ffn_norm(x_btd)
        if self.moe:
            y_btd, stats = self.ffn(h_btd, segment_ids_bt)
        else:
            y_btd, stats = self.ffn(h_btd), {}
        return constrain(x_btd + y_btd.astype(x_btd.dtype), RESIDUAL), stats


def stacked_blocks(cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> Block:
    """``count`` blocks with parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, moe, rngs=r)

    return make(rngs)


def scan_blocks(blocks: Block, x_btd, cos, sin, segment_ids_bt, remat: str):
    """Run stacked blocks in order with one scan; per-layer stats come back stacked [L, ...]."""
    graphdef, state = nnx.split(blocks)

    def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, cos, sin, segment_ids_bt)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x_btd, state)


class Decoder(nnx.Module):
    """tokens [B, T] -> (logits [B, T, N] float32, aux).

    ``positions`` default to 0..T-1 per row; with packed sequences pass positions that
    restart per document and ``segment_ids`` (0 marks padding; attention never crosses a
    segment). ``aux`` holds ``expert_load`` [L_moe, E] and the summed ``aux_loss``.

    Under a ``parallel.layout`` (entered inside the jitted caller) the residual stream is
    constrained to x[batch, length, act_embed] at every block boundary; when ``length`` is
    split over ``sequence`` the tokens are laid out zig-zag for ring attention on the way
    in and the hidden states restored to natural order on the way out, so callers never see
    the permutation.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.ctx, rngs=rngs)
        self.dense_blocks = stacked_blocks(cfg, False, cfg.num_dense_layers, rngs) if cfg.num_dense_layers else None
        self.moe_blocks = stacked_blocks(cfg, True, cfg.num_moe_layers, rngs) if cfg.num_moe_layers else None
        self.final_norm = RMSNorm(cfg.d_model, cfg.ctx, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.vocab_size, cfg.ctx, rngs=rngs)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None) -> tuple[jax.Array, dict[str, Any]]:
        x_btd, aux = self.features(tokens_bt, positions_bt, segment_ids_bt)
        logits_btn = self.embed.attend(x_btd) if self.lm_head is None else self.lm_head(x_btd)
        return logits_btn, aux

    def output_weight(self) -> tuple[jax.Array, str]:
        """The output projection and its layout: (W [D, N], "dn"), or the tied table ([N, D], "nd")."""
        return (self.embed.table[...], "nd") if self.lm_head is None else (self.lm_head.w[...], "dn")

    def features(self, tokens_bt, positions_bt=None, segment_ids_bt=None) -> tuple[jax.Array, dict[str, Any]]:
        """The final-normed hidden states [B, T, D] the LM head reads, and ``aux``.

        Training feeds them to ``training.losses.head_loss`` with ``output_weight()``, which never
        forms the whole batch's logits."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        layout = current()
        ring = layout.size("length") if layout is not None else 1
        if ring > 1:  # sequence parallel: lay the length axis out zig-zag once (see parallel.ring)
            order = zigzag_permutation(t, ring)
            tokens_bt, positions_bt = tokens_bt[:, order], positions_bt[:, order]
            segment_ids_bt = None if segment_ids_bt is None else segment_ids_bt[:, order]
        cos, sin = Rotary(cfg.rope, cfg.attention.rope_dim).tables(positions_bt)
        x_btd = constrain(self.embed(tokens_bt), RESIDUAL)
        aux: dict[str, Any] = {"aux_loss": jnp.zeros((), jnp.float32)}
        if self.dense_blocks is not None:
            x_btd, _ = scan_blocks(self.dense_blocks, x_btd, cos, sin, segment_ids_bt, cfg.remat)
        if self.moe_blocks is not None:
            x_btd, stats = scan_blocks(self.moe_blocks, x_btd, cos, sin, segment_ids_bt, cfg.remat)
            aux = {"expert_load": stats["load"], "aux_loss": jnp.sum(stats["aux_loss"])}
        x_btd = self.final_norm(x_btd)
        if ring > 1:
            x_btd = constrain(x_btd[:, inverse_permutation(order)], RESIDUAL)
        return x_btd, aux


def update_router_bias(model: Decoder, load_le, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing, after each optimiser step:
    bias_e += rate * sign(mean load - load_e), per MoE layer. ``load_le`` is [L_moe, E]."""
    if model.moe_blocks is None:
        return
    bias = model.moe_blocks.ffn.router.bias
    bias[...] = bias[...] + rate * jnp.sign(jnp.mean(load_le, axis=-1, keepdims=True) - load_le)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised model, built inside one jitted call (eager init is many small ops)."""
    return nnx.jit(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))()


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStructs for values: shapes and metadata, nothing allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
