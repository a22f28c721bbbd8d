"""Packing documents into fixed-length training rows.

Each document becomes ``[bos] + tokens + [eos]`` and contributes its (input, next-token)
pairs. Pairs of all documents are laid end to end and cut into rows of ``seq_len``: no
padding except at the very end, and a document that crosses a row boundary continues as a
new segment of the next row. Per row, ``segment_ids`` number the document pieces from 1
(0 is padding), ``positions`` restart at 0 for every piece, and ``loss_mask`` is 1 exactly
where there is a real target. The model's attention never crosses a segment.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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


class Packer:
    """Packs documents into rows one row at a time, and can say where it is.

    ``docs`` yields ``(source, tokens)`` in stream order (a position is one document, empty
    ones included); a document contributes the pairs of ``[bos] + tokens + [eos]``.
    ``state()`` is the position and offset (pairs already packed) of the document the next
    row starts in: a new ``Packer`` given the documents from that position on, with that
    offset, continues exactly. ``row()`` returns the row and the pairs it took from each
    source; when ``docs`` ends, the last row is padded (segment 0) and ``row()`` then returns
    None."""

    def __init__(
        self,
        docs,
        seq_len: int,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int = 0,
        position: int = 0,
        offset: int = 0,
        num_sources: int = 1,
    ):
        self.docs, self.seq_len, self.pad_id = iter(docs), seq_len, pad_id
        self.prefix = np.asarray([bos_id] if bos_id is not None and bos_id >= 0 else [], np.int32)
        self.suffix = np.asarray([eos_id], np.int32)
        self.next_position, self.start_offset = position, offset
        self.current: tuple[int, int, np.ndarray] | None = None  # (position, source, [bos]+tokens+[eos])
        self.offset = 0
        self.num_sources = num_sources

    def state(self) -> dict:
        position, offset = (self.current[0], self.offset) if self.current else (self.next_position, 0)
        return {"position": int(position), "offset": int(offset)}

    def _pull(self) -> bool:
        """Make the next non-empty document current; False when the stream has ended."""
        while self.current is None:
            try:
                source, toks = next(self.docs)
            except StopIteration:
                return False
            position, self.next_position = self.next_position, self.next_position + 1
            seq = np.concatenate([self.prefix, np.asarray(toks, np.int32), self.suffix])
            offset, self.start_offset = self.start_offset, 0
            if len(seq) - 1 > offset:
                self.current, self.offset = (position, source, seq), offset
        return True

    def row(self) -> tuple[Rows, np.ndarray] | None:
        L = self.seq_len
        x, y = np.full(L, self.pad_id, np.int32), np.full(L, self.pad_id, np.int32)
        seg, pos = np.zeros(L, np.int32), np.zeros(L, np.int32)
        filled, piece = 0, 0
        counts = np.zeros(self.num_sources, np.int64)
        while filled < L and self._pull():
            _, source, seq = self.current
            n = min(L - filled, len(seq) - 1 - self.offset)
            o = self.offset
            x[filled : filled + n], y[filled : filled + n] = seq[o : o + n], seq[o + 1 : o + 1 + n]
            piece += 1
            seg[filled : filled + n], pos[filled : filled + n] = piece, np.arange(n)
            filled, self.offset = filled + n, o + n
            counts[source] += n
            if self.offset == len(seq) - 1:
                self.current = None
        if filled == 0:
            return None
        return Rows(x[None], y[None], seg[None], pos[None]), counts


def concat(rows: list[Rows]) -> Rows:
    return Rows(*(np.concatenate([getattr(r, f.name) for r in rows]) for f in fields(Rows)))
