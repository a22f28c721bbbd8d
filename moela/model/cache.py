"""The paged KV cache as the model sees it: one pool for all layers and the view of one step.

The pool is ``[L, N, P, G, W]`` (``moela.kernels.paged``): L layers, N pages of P token rows, G kv
heads, row width W. For MLA a row is the normalised latent and the roped shared key,
``[c_kv | k_pe]`` (kv_lora_rank + qk_rope_head_dim values, G = 1), which is all absorbed decode
needs; for GQA it is ``[k | v]`` per kv head. Page ids are shared by all layers: a sequence owns
page i in every layer at once, so one page table serves the whole stack.

A :class:`PagedCache` is what one serving step passes through the model's forward: the pool and
the ragged metadata of the step's packed tokens. Each attention layer writes its new rows
(``write``) and reads the cache back through ``kernels.paged``; which pages a sequence owns is the
host's business (``moela.inference.pages``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moela.configs.schema import ModelConfig
from moela.kernels import paged
from moela.kernels.paged import RowFormat

CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedCache:
    """One step's view of the cache::

    pool         [L, N, P, G, W]  every layer's rows
    slots        [T]              where each packed token's row goes (page · P + offset; -1: padding)
    kv_lens      [S]              cache length per sequence, this step's tokens included
    page_table   [S, M]           each sequence's pages, in order
    cu_q_lens    [S + 1]          sequence s owns packed tokens cu_q_lens[s] : cu_q_lens[s + 1]
    num_seqs     []               sequences in use (the rest of S is padding)
    """

    pool: jax.Array
    slots: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array

    def write(self, rows_tgw, layer) -> PagedCache:
        """The cache with ``rows`` [T, G, W] (one per packed token) written into ``layer``."""
        return dataclasses.replace(self, pool=paged.write_rows(self.pool, rows_tgw, self.slots, layer))

    @property
    def real_tokens(self):
        """[T] bool: which packed tokens are real (padding has slot -1)."""
        return self.slots >= 0


def row_format(cfg: ModelConfig) -> RowFormat:
    att = cfg.attention
    if att.kind == "mla":
        return RowFormat.mla(att.kv_lora_rank, att.qk_rope_head_dim)
    return RowFormat.gqa(att.head_dim)


def kv_heads(cfg: ModelConfig) -> int:
    return 1 if cfg.attention.kind == "mla" else cfg.attention.num_kv_heads


def bytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> dict[str, int]:
    """Cache bytes one token costs over all layers: as stored, and as expanded per-head K/V
    (what a non-absorbed MLA cache, e.g. transformers', holds)."""
    att, itemsize = cfg.attention, jnp.dtype(CACHE_DTYPES[dtype]).itemsize
    stored = cfg.num_layers * kv_heads(cfg) * row_format(cfg).width * itemsize
    if att.kind == "mla":
        expanded = cfg.num_layers * att.num_heads * (att.qk_head_dim + att.v_head_dim) * itemsize
    else:
        expanded = stored
    return {"stored": stored, "expanded_kv": expanded}


def init_pool(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32", sharding=None, extra_layers: int = 0
):
    """A zeroed pool [L, N, P, G, W], created in place on ``sharding`` when given. ``extra_layers``
    adds layers after the model's (the MTP draft's, for speculative decoding)."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} not supported; valid: {', '.join(CACHE_DTYPES)}")
    shape = (cfg.num_layers + extra_layers, num_pages, page_size, kv_heads(cfg), row_format(cfg).width)
    return jax.jit(lambda: jnp.zeros(shape, CACHE_DTYPES[dtype]), out_shardings=sharding)()
