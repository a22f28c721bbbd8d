"""The serving forward pass: the trained decoder run over a packed ragged batch with a paged cache.

Every token of the batch (decode tokens, prefill chunks, whole prompts, packed one sequence
after another as ``[T]``) goes through the same layers as in training (the decoder's own
modules and weights), except attention, which writes each new token's cache row into its page
and then reads the sequence's whole cache through ``kernels.paged.ragged_paged_attention``.

MLA runs *absorbed* (DeepSeek-V2 §2.1.2): the cache holds only ``[c_kv | k_pe]`` per token;
queries are mapped into latent space, q_lat = q_nope · W_UK (per head), attention runs as MQA
over the latent rows with keys [c_kv | k_pe] and values c_kv, and the per-head latent output
leaves through W_UV. Since q_nope·(W_UKᵀ c) = (q_nope·W_UK)·c and the softmax weights are the
same, this equals the expanded computation; but it never materialises per-head K/V, so a
decode step reads (R + P) values per cached token instead of H·(K + V).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moela.inference.experts import moe_ffn
from moela.kernels import paged
from moela.model.attention import MLA
from moela.model.layers import project
from moela.model.rope import Rotary
from moela.parallel import layout as layout_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One engine step's packed ragged batch (host-built, bucket-padded)::

        tokens, positions, slots   [T]    token ids, positions, cache slots (-1: padding)
        kv_lens                    [S]    cache length per sequence after this step's tokens
        page_table                 [S, M]
        cu_q_lens                  [S+1]
        num_seqs                   []     sequences in use
        last_index                 [S]    packed index of each sequence's last token this step
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    last_index: jax.Array


def _paged_attention(q_thk, pool, batch: Batch, layer, *, scale, fmt, impl):
    """``ragged_paged_attention`` under the current layout: GSPMD for the reference, one kernel call
    per tensor-parallel shard of the query heads (and kv heads, for GQA) for the Pallas kernels."""
    args = (pool, batch.kv_lens, batch.page_table, batch.cu_q_lens, batch.num_seqs, jnp.asarray(layer, jnp.int32))
    layout = layout_lib.current()
    heads = None if layout is None else layout.axis("act_heads")
    if heads is None or paged.resolve(impl) == "reference":
        return paged.ragged_paged_attention(q_thk, *args, scale=scale, fmt=fmt, impl=impl)
    kv_split = heads if pool.shape[3] > 1 else None
    q_spec, pool_spec = P(None, heads, None), P(None, None, None, kv_split, None)

    def local(q, pool, *meta):
        return paged.ragged_paged_attention(q, pool, *meta, scale=scale, fmt=fmt, impl=impl)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(q_spec, pool_spec) + (P(),) * 5, out_specs=q_spec,
                         check_vma=False)(q_thk, *args)


def mla_absorbed(attn: MLA, x_td, cos, sin, pool, batch: Batch, layer, impl: str):
    """MLA over the paged latent cache; returns (out [T, D], pool with this step's rows written)."""
    cfg = attn.cfg
    x_btd = x_td[None].astype(attn.compute_dtype)
    q_nope, q_pe = attn.queries(x_btd, cos, sin)  # [1, T, H, nope], [1, T, H, P]
    c_btr, k_pe_btp = attn.latent(x_btd, cos, sin)
    rows_tgw = jnp.concatenate([c_btr[0], k_pe_btp[0]], axis=-1)[:, None, :]
    pool = paged.write_rows(pool, rows_tgw, batch.slots, layer)
    q_lat_thr = jnp.einsum("thn,rhn->thr", q_nope[0], attn._w(attn.w_uk))
    q_thw = jnp.concatenate([q_lat_thr, q_pe[0].astype(q_lat_thr.dtype)], axis=-1)
    fmt = paged.RowFormat.mla(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    out_thr = _paged_attention(q_thw, pool, batch, layer, scale=attn.scale, fmt=fmt, impl=impl)
    out_thv = jnp.einsum("thr,rhv->thv", out_thr.astype(q_lat_thr.dtype), attn._w(attn.w_uv))
    return project(out_thv, attn._w(attn.wo), contract=2), pool


def gqa_paged(attn, x_td, cos, sin, pool, batch: Batch, layer, impl: str):
    """GQA over the paged [k | v] cache; returns (out [T, D], pool)."""
    cd = attn.compute_dtype
    x_btd = x_td[None].astype(cd)
    q_thk = Rotary.apply(project(x_btd, attn.wq[...].astype(cd)), cos, sin)[0]
    k_tgk = Rotary.apply(project(x_btd, attn.wk[...].astype(cd)), cos, sin)[0]
    v_tgk = project(x_btd, attn.wv[...].astype(cd))[0]
    pool = paged.write_rows(pool, jnp.concatenate([k_tgk, v_tgk], axis=-1), batch.slots, layer)
    fmt = paged.RowFormat.gqa(attn.cfg.head_dim)
    out_thk = _paged_attention(q_thk, pool, batch, layer, scale=attn.scale, fmt=fmt, impl=impl)
    return project(out_thk.astype(cd), attn.wo[...].astype(cd), contract=2), pool


def _layer(block, x_td, cos, sin, pool, batch: Batch, layer: int, real_t, impl: str):
    attend = mla_absorbed if isinstance(block.attn, MLA) else gqa_paged
    a_td, pool = attend(block.attn, block.attn_norm(x_td), cos, sin, pool, batch, layer, impl)
    x_td = x_td + a_td.astype(x_td.dtype)
    h_td = block.ffn_norm(x_td)
    y_td = moe_ffn(block.ffn, h_td, real_t) if block.moe else block.ffn(h_td[None])[0]
    return x_td + y_td.astype(x_td.dtype), pool


@dataclasses.dataclass(frozen=True)
class Graph:
    """The static half of a split decoder (hashable: a jit static argument)."""

    cfg: Any
    embed: Any
    final_norm: Any
    dense: Any
    moe: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    """The array half: embedding, final norm, one state per layer (unstacked), and the output
    projection as [N, D] rows."""

    embed: Any
    final_norm: Any
    dense: list
    moe: list
    head_nd: jax.Array


def split_model(model) -> tuple[Graph, Weights]:
    """The decoder split for serving, with its layers *unstacked* into one state per layer.

    Training scans over layer-stacked weights; a decode step is memory-bound, and the scan's
    per-layer dynamic slice copies every weight of the layer before reading it: at batch 1 on
    the ``bench`` preset, copying the 16 experts of each layer (of which a token uses 2) took 22
    of a 25 ms step. Separate buffers per layer, sliced once here, are read in place; the layer
    loop is unrolled (one trace per layer: fine for serving's few compiled shapes)."""

    def unstack(blocks):
        if blocks is None:
            return None, []
        graphdef, state = nnx.split(blocks)
        count = jax.tree.leaves(state)[0].shape[0]

        layers = jax.jit(lambda st: [jax.tree.map(lambda a: a[i], st) for i in range(count)])(state)
        return graphdef, layers

    embed_g, embed_s = nnx.split(model.embed)
    norm_g, norm_s = nnx.split(model.final_norm)
    dense_g, dense_s = unstack(model.dense_blocks)
    moe_g, moe_s = unstack(model.moe_blocks)
    head = jax.jit(output_rows)(model)
    return Graph(model.cfg, embed_g, norm_g, dense_g, moe_g), Weights(embed_s, norm_s, dense_s, moe_s, head)


def output_rows(model):
    """The output projection as [N, D] rows (the tied table, or the LM head transposed once).
    XLA's CPU matmul of a few rows against [D, N] ran 2x slower than against [N, D] (bench
    preset, 8 rows x 32000: 6.2 vs 3.3 ms), and a decode step reads the whole head."""
    weight, kind = model.output_weight()
    return weight if kind == "nd" else jnp.transpose(weight)


def forward(graph: Graph, weights: Weights, pool, batch: Batch, impl: str = "auto") -> tuple[jax.Array, Any]:
    """(logits [S, V] float32 at each sequence's last token of the step, the updated pool)."""
    cfg = graph.cfg
    cos, sin = Rotary(cfg.rope, cfg.attention.rope_dim).tables(batch.positions[None])
    x_td = nnx.merge(graph.embed, weights.embed)(batch.tokens[None])[0]
    real_t = batch.slots >= 0
    stack = [(graph.dense, s) for s in weights.dense] + [(graph.moe, s) for s in weights.moe]
    for layer, (graphdef, state) in enumerate(stack):
        x_td, pool = _layer(nnx.merge(graphdef, state), x_td, cos, sin, pool, batch, layer, real_t, impl)
    h_sd = nnx.merge(graph.final_norm, weights.final_norm)(x_td[batch.last_index])
    logits = jnp.einsum("sd,nd->sn", h_sd, weights.head_nd.astype(h_sd.dtype), preferred_element_type=jnp.float32)
    return logits, pool


def forward_model(model, pool, batch: Batch, impl: str = "auto"):
    """``forward`` straight from a ``Decoder`` (tests; the engine splits once)."""
    return forward(*split_model(model), pool, batch, impl)
