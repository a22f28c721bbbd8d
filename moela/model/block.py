"""The decoder block, and how a stack of them runs.

A ``Block`` is pre-norm: x + attn(norm(x)), then + ffn(norm(x)), where ffn is a SwiGLU or a
MoE. Blocks of one kind are created stacked (``stacked_blocks``: every parameter gains a leading
``layers`` axis) and run with one ``jax.lax.scan`` (``run_blocks``), so compile time does not grow
with depth; ``runtime.remat`` picks the rematerialisation policy of the scanned body. A list of
blocks (the serving layout, the multi-token-prediction modules) runs unrolled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moela.configs.schema import ModelConfig
from moela.model.attention import ATTENTION
from moela.model.cache import PagedCache
from moela.model.layers import RMSNorm, SwiGLU
from moela.model.moe import MoE
from moela.model.runtime import Runtime

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

    def __call__(
        self, x_btd, cos, sin, segment_ids_bt, *, rt: Runtime = Runtime(), cache: PagedCache | None = None, layer=0
    ):
        """(x [B, T, D], MoE stats, cache)."""
        x_btd = rt.constrain(x_btd, RESIDUAL)
        a_btd, cache = self.attn(self.attn_norm(x_btd), cos, sin, segment_ids_bt, rt=rt, cache=cache, layer=layer)
        x_btd = rt.constrain(x_btd + a_btd.astype(x_btd.dtype), RESIDUAL)
        h_btd = self.ffn_norm(x_btd)
        if self.moe:
            y_btd, stats = self.ffn(h_btd, segment_ids_bt, rt=rt, inference=cache is not None)
        else:
            y_btd, stats = self.ffn(h_btd), {}
        return rt.constrain(x_btd + y_btd.astype(x_btd.dtype), RESIDUAL), stats, cache


def stacked_blocks(cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs) -> Block:
    """``count`` blocks with parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, moe, rngs=r)

    return make(rngs)


def run_blocks(
    blocks: Block | nnx.List,
    x_btd,
    cos,
    sin,
    segment_ids_bt,
    *,
    rt: Runtime,
    cache: PagedCache | None = None,
    first_layer: int = 0,
):
    """Run blocks in order: stacked ones with one scan, a list (the serving layout) unrolled.
    Returns (x, per-layer stats stacked [L, ...], cache); layer i of the cache is
    ``first_layer + i``."""
    if isinstance(blocks, nnx.List):
        stats = []
        for i, block in enumerate(blocks):
            x_btd, s, cache = block(x_btd, cos, sin, segment_ids_bt, rt=rt, cache=cache, layer=first_layer + i)
            stats.append(s)
        return x_btd, jax.tree.map(lambda *a: jnp.stack(a), *stats), cache
    graphdef, state = nnx.split(blocks)
    if cache is None:

        def body(x, layer_state):
            x, stats, _ = nnx.merge(graphdef, layer_state)(x, cos, sin, segment_ids_bt, rt=rt)
            return x, stats

        if rt.config.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[rt.config.remat], prevent_cse=False)
        x_btd, stats = jax.lax.scan(body, x_btd, state)
        return x_btd, stats, None

    def cached_body(carry, layer_input):
        x, c = carry
        layer_state, i = layer_input
        x, stats, c = nnx.merge(graphdef, layer_state)(
            x, cos, sin, segment_ids_bt, rt=rt, cache=c, layer=first_layer + i
        )
        return (x, c), stats

    count = jax.tree.leaves(state)[0].shape[0]
    (x_btd, cache), stats = jax.lax.scan(cached_body, (x_btd, cache), (state, jnp.arange(count)))
    return x_btd, stats, cache
