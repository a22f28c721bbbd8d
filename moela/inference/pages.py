"""The page allocator of the paged KV cache: plain Python on the host.

The device pool and what a step passes through the model are ``moela.model.cache``; here is who
owns which page. Page ids are shared by all layers (a sequence owns page i in every layer at
once), so one page table serves the whole stack. Appending is copy-free: a token's row goes to
slot ``page_table[pos // P] * P + pos % P`` and nothing already written moves. The device only
ever sees page tables.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
