"""Packing documents into fixed-length training rows.

Each document becomes ``[bos] + tokens + [eos]`` and contributes its (input, next-token)
pairs. Pairs of all documents are laid end to end and cut into rows of ``seq_len``: no
padding except at the very end, and a document that crosses a row boundary continues as a
new segment of the next row. Per row, ``segment_ids`` number the document pieces from 1
(0 is padding), ``positions`` restart at 0 for every piece, and ``loss_mask`` is 1 exactly
where there is a real target. The model's attention never crosses a segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Rows:
    """Packed rows, all int32 [R, L] except ``loss_mask`` (float32)."""

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @property
    def loss_mask(self) -> np.ndarray:
        return (self.segment_ids > 0).astype(np.float32)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def as_batch(self) -> dict[str, np.ndarray]:
        """The arrays a training or evaluation step takes."""
        return {
            "inputs": self.inputs,
            "targets": self.targets,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
            "loss_mask": self.loss_mask,
        }

    def take(self, index) -> "Rows":
        return Rows(self.inputs[index], self.targets[index], self.segment_ids[index], self.positions[index])


def stream(docs: Iterable[list[int]], eos_id: int, bos_id: int | None = None):
    """(inputs, targets, doc ids) of all documents end to end, int32."""
    inputs, targets, doc_ids = [], [], []
    for i, toks in enumerate(docs):
        seq = ([bos_id] if bos_id is not None and bos_id >= 0 else []) + list(toks) + [eos_id]
        if len(seq) < 2:
            continue
        arr = np.asarray(seq, np.int32)
        inputs.append(arr[:-1])
        targets.append(arr[1:])
        doc_ids.append(np.full(len(arr) - 1, i, np.int32))
    if not inputs:
        empty = np.zeros((0,), np.int32)
        return empty, empty, empty
    return np.concatenate(inputs), np.concatenate(targets), np.concatenate(doc_ids)


def pack(inputs: np.ndarray, targets: np.ndarray, doc_ids: np.ndarray, seq_len: int, pad_id: int = 0) -> Rows:
    """Cut a pair stream into rows of ``seq_len`` with per-row segment ids and positions."""
    n = len(inputs)
    num_rows = max(1, -(-n // seq_len))
    total = num_rows * seq_len

    def padded(a, fill):
        out = np.full(total, fill, np.int32)
        out[:n] = a
        return out.reshape(num_rows, seq_len)

    x, y, doc = padded(inputs, pad_id), padded(targets, pad_id), padded(doc_ids, -1)
    starts = np.ones_like(doc, dtype=bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    segments = np.cumsum(starts, axis=1).astype(np.int32)
    segments[doc < 0] = 0
    col = np.broadcast_to(np.arange(seq_len, dtype=np.int32), doc.shape)
    run_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    positions = np.where(doc < 0, 0, col - run_start).astype(np.int32)
    return Rows(x, y, segments, positions)


def pack_documents(
    docs: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int = 0, bos_id: int | None = None
) -> Rows:
    return pack(*stream(docs, eos_id, bos_id), seq_len=seq_len, pad_id=pad_id)
