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

from kernels import paged
from model.attention import MLA
from model.experts import block_layout
from model.layers import project
from model.rope import Rotary
from parallel import layout as layout_lib


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
    args = (pool, batch.kv_lens, batch.page_table, batch.cu_q_lens, batch.num_seqs, layer)
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


def expert_block_rows(tokens: int, moe) -> int:
    """Rows per block of the grouped expert matmul for a step of ``tokens`` tokens. Every expert's
    rows are padded to whole blocks; training's 128 would make a 32-token decode step compute 17
    blocks of 128 rows per layer, mostly padding. Serving takes about one block per expert's
    expected share, T·k/E rows, as a power of two in [8, 128]."""
    share = max(tokens * moe.experts_per_token // moe.num_experts, 1)
    return min(128, max(8, 1 << (share - 1).bit_length()))


def routed_experts(x_td, weights_tk, ids_tk, real_t, w_gate_ledf, w_up_ledf, w_down_lefd, layer, block: int):
    """Dropless routed SwiGLU of one layer, reading experts straight from the layer-stacked
    weights [L, E, ...]: each used block fetches only its expert, w[layer, e].

    Slicing the layer out first (what a scan over stacked parameters does) would copy all E
    experts of the layer every step, although a decode batch touches a few: at batch 1 on the
    ``bench`` preset that copy was 22 of a 25 ms step. Padding tokens' pairs are routed to no
    expert, so they cost nothing."""
    t, k = ids_tk.shape
    e, d = w_gate_ledf.shape[1], x_td.shape[-1]
    key_p = jnp.where(real_t[:, None], ids_tk, e).reshape(-1)  # padding sorts past every group
    order_p = jnp.argsort(key_p, stable=True)
    group_sizes_e = jnp.bincount(key_p, length=e).astype(jnp.int32)
    x_pd = jnp.take(x_td, order_p // k, axis=0)
    dest_p, block_expert_n, num_blocks = block_layout(group_sizes_e, t * k, block)
    used = jnp.sum((group_sizes_e + block - 1) // block).astype(jnp.int32)
    x_nbd = jnp.zeros((num_blocks * block, d), x_td.dtype).at[dest_p].set(x_pd, mode="drop")
    x_nbd = x_nbd.reshape(num_blocks, block, d)

    def one_block(i, y_nbd):
        x_bd, expert = x_nbd[i], block_expert_n[i]
        gate = jnp.matmul(x_bd, w_gate_ledf[layer, expert].astype(x_bd.dtype))
        up = jnp.matmul(x_bd, w_up_ledf[layer, expert].astype(x_bd.dtype))
        y_bd = jnp.matmul(jax.nn.silu(gate) * up, w_down_lefd[layer, expert].astype(x_bd.dtype))
        return jax.lax.dynamic_update_index_in_dim(y_nbd, y_bd, i, 0)

    y_nbd = jax.lax.fori_loop(0, used, one_block, jnp.zeros_like(x_nbd))
    y_pd = y_nbd.reshape(num_blocks * block, d).at[dest_p].get(mode="fill", fill_value=0)
    weight_p = jnp.take(weights_tk.reshape(-1), order_p).astype(y_pd.dtype)
    return jnp.zeros_like(x_td).at[order_p // k].add(y_pd * weight_p[:, None])


def _moe(block, stacked, h_td, real_t, layer):
    """The MoE feed-forward of one layer: the block's router and shared experts, and the routed
    experts read from the stacked weights (``routed_experts``)."""
    moe = block.ffn
    weights_tk, ids_tk, _ = moe.router(h_td)
    block_rows = expert_block_rows(h_td.shape[0], moe.cfg)
    y_td = routed_experts(h_td, weights_tk, ids_tk, real_t, *stacked, layer, block_rows)
    if moe.shared is not None:
        y_td = y_td + moe.shared(h_td).astype(y_td.dtype)
    return y_td


def _run_blocks(blocks, x_td, cos, sin, pool, batch: Batch, first_layer: int, real_t, impl: str):
    graphdef, state = nnx.split(blocks)
    count = jax.tree.leaves(state)[0].shape[0]
    stacked = None
    if blocks.moe:
        experts = blocks.ffn.experts
        cd = experts.compute_dtype
        stacked = tuple(w[...].astype(cd) for w in (experts.w_gate, experts.w_up, experts.w_down))

    def body(carry, xs):
        x, pool = carry
        layer_state, index = xs
        block = nnx.merge(graphdef, layer_state)  # the routed experts' slices go unused: XLA drops them
        attend = mla_absorbed if isinstance(block.attn, MLA) else gqa_paged
        a_td, pool = attend(block.attn, block.attn_norm(x), cos, sin, pool, batch, first_layer + index, impl)
        x = x + a_td.astype(x.dtype)
        h_td = block.ffn_norm(x)
        y_td = _moe(block, stacked, h_td, real_t, index) if block.moe else block.ffn(h_td[None])[0]
        return (x + y_td.astype(x.dtype), pool), None

    indices = jnp.arange(count, dtype=jnp.int32)
    (x_td, pool), _ = jax.lax.scan(body, (x_td, pool), (state, indices))
    return x_td, pool


def output_rows(model):
    """The output projection as [N, D] rows (the tied table, or the LM head transposed once).
    XLA's CPU matmul of a few rows against [D, N] ran 2x slower than against [N, D] (bench
    preset, 8 rows x 32000: 6.2 vs 3.3 ms), and a decode step reads the whole head."""
    weight, kind = model.output_weight()
    return weight if kind == "nd" else jnp.transpose(weight)


def forward(model, pool, batch: Batch, impl: str = "auto", head_nd=None) -> tuple[jax.Array, Any]:
    """(logits [S, V] float32 at each sequence's last token of the step, the updated pool).
    ``head_nd`` is ``output_rows(model)``, computed once by the caller (else here)."""
    cfg = model.cfg
    cos, sin = Rotary(cfg.rope, cfg.attention.rope_dim).tables(batch.positions[None])
    x_td = model.embed(batch.tokens[None])[0]
    real_t = batch.slots >= 0
    if model.dense_blocks is not None:
        x_td, pool = _run_blocks(model.dense_blocks, x_td, cos, sin, pool, batch, 0, real_t, impl)
    if model.moe_blocks is not None:
        x_td, pool = _run_blocks(model.moe_blocks, x_td, cos, sin, pool, batch, cfg.num_dense_layers, real_t, impl)
    h_sd = model.final_norm(x_td[batch.last_index])
    head_nd = output_rows(model) if head_nd is None else head_nd
    logits = jnp.einsum("sd,nd->sn", h_sd, head_nd.astype(h_sd.dtype), preferred_element_type=jnp.float32)
    return logits, pool
