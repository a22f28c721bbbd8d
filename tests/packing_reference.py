"""The whole-list packing reference: every document's pairs laid end to end with NumPy and cut
into rows at once. The streaming ``moela.data.packing.Packer`` must produce exactly these rows."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from moela.data.packing import Rows


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
