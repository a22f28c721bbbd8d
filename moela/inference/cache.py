"""The paged KV cache: one device pool for all layers, and the host-side page allocator.

The pool is ``[L, N, P, G, W]`` (``kernels.paged``): L layers, N pages of P token rows, G kv
heads, row width W. For MLA a row is the normalised latent and the roped shared key,
``[c_kv | k_pe]`` (kv_lora_rank + qk_rope_head_dim values, G = 1), which is all absorbed decode
needs; for GQA it is ``[k | v]`` per kv head. Page ids are shared by all layers: a sequence
owns page i in every layer at once, so one page table serves the whole stack.

Appending is copy-free: a token's row goes to slot ``page_table[pos // P] * P + pos % P`` and
nothing already written moves. The allocator is plain Python on the host (a free list and
per-sequence page lists); the device only ever sees page tables.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from moela.configs.schema import ModelConfig
from moela.kernels.paged import RowFormat

CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32", sharding=None):
    """A zeroed pool [L, N, P, G, W]."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} not supported; valid: {', '.join(CACHE_DTYPES)}")
    shape = (cfg.num_layers, num_pages, page_size, kv_heads(cfg), row_format(cfg).width)
    if sharding is None:
        return jnp.zeros(shape, CACHE_DTYPES[dtype])
    import jax

    return jax.jit(lambda: jnp.zeros(shape, CACHE_DTYPES[dtype]), out_shardings=sharding)()


class OutOfPages(Exception):
    """The pool has no free page for a request; the scheduler preempts or waits."""


@dataclasses.dataclass
class PageAllocator:
    """Free list over page ids ``0 .. num_pages-1`` and each sequence's pages in order."""

    num_pages: int
    page_size: int

    def __post_init__(self):
        if self.num_pages < 1 or self.page_size < 1:
            raise ValueError(f"need at least one page of at least one row; got {self.num_pages} x {self.page_size}")
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.pages: dict[int, list[int]] = {}
        self.peak_used = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def can_hold(self, seq_id: int, tokens: int) -> bool:
        """Could ``seq_id`` grow to ``tokens`` rows with the pages free now?"""
        return self.pages_for(tokens) - len(self.pages.get(seq_id, ())) <= self.free

    def reserve(self, seq_id: int, tokens: int) -> list[int]:
        """Grow ``seq_id``'s pages to hold ``tokens`` rows (all or nothing); returns its page list."""
        owned = self.pages.setdefault(seq_id, [])
        need = self.pages_for(tokens) - len(owned)
        if need > len(self._free):
            raise OutOfPages(f"sequence {seq_id} needs {need} more pages, {len(self._free)} free")
        for _ in range(max(need, 0)):
            owned.append(self._free.pop())
        self.peak_used = max(self.peak_used, self.used)
        return owned

    def release(self, seq_id: int) -> None:
        """Return all of ``seq_id``'s pages to the free list."""
        self._free.extend(reversed(self.pages.pop(seq_id, [])))

    def slots(self, seq_id: int, start: int, stop: int) -> np.ndarray:
        """Flat pool slots (page · P + offset) of positions ``start .. stop-1`` of ``seq_id``."""
        pages = np.asarray(self.pages[seq_id], np.int32)
        pos = np.arange(start, stop, dtype=np.int32)
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size
