"""Random-access record sources: every kind of corpus as ``len`` + ``source[i] -> text``.

A source spec (``data.dataset``, or each entry of ``data.mixture``) is one of

- ``moela_text``: the embedded builder over local text files (``data.text_glob``);
- a tfds name (``lm1b``, ``c4/en:3.1.0``) prepared in array_record format under ``data.data_dir``;
- ``jsonl:GLOB``: JSON Lines files, one object per non-empty line, text in ``data.text_field``;
- ``array_record:GLOB``: ArrayRecord files whose records are UTF-8 text or JSON objects.

In a file glob ``{split}`` stands for the split's name (``/data/{split}-*.jsonl``); a glob without
it has a training split only. Sources are picklable (grain's worker processes unpickle them) and
never raise on a bad record: ``source[i]`` returns :class:`Unreadable`, whose message names the
file and the record, so the error reaches the training process in order and whole.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from moela.configs.schema import DataConfig, parse_mixture
from moela.data.text_builder import DataError, build

EMBEDDED = "moela_text"
FILE_KINDS = ("jsonl", "array_record")


@dataclass(frozen=True)
class Unreadable:
    """A record that could not be read or decoded; ``message`` names the file and the record."""

    message: str


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _text(value, where: str) -> str | Unreadable:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return Unreadable(f"{where}: the text field holds {type(value).__name__}, not text")


class TfdsRecords:
    """A split of a tfds dataset through ``builder.as_data_source()`` (array_record, no TensorFlow)."""

    def __init__(self, name: str, builder, split: str, field: str, limit: int = 0):
        sources = builder.as_data_source()
        if split not in sources:
            raise DataError(f"dataset '{name}' has no split '{split}'; splits: {', '.join(sorted(sources))}")
        self.name, self.field, self.directory = name, field, Path(builder.data_dir)
        self.source = sources[split]
        self.files = [(f.filename, f.skip, f.take) for f in builder.info.splits[split].file_instructions]
        self.size = min(limit, len(self.source)) if limit else len(self.source)
        if self.size and field not in self.source[0]:
            raise DataError(
                f"data.text_field '{field}' is not a feature of '{name}'; features: {', '.join(sorted(self.source[0]))}"
            )

    def __getstate__(self):
        return {**self.__dict__, "source": pickle.dumps(self.source)}

    def __setstate__(self, state):
        # unpickling a tfds source re-creates its builder config, which tfds announces through absl
        logging.getLogger("absl").setLevel(logging.ERROR)
        self.__dict__.update({**state, "source": pickle.loads(state["source"])})

    def __len__(self) -> int:
        return self.size

    def where(self, i: int) -> str:
        for filename, skip, take in self.files:
            if i < take:
                return f"record {skip + i} of {filename}"
            i -= take
        return f"record {i} past the end of {self.name}"

    def __getitem__(self, i: int) -> str | Unreadable:
        try:
            record = self.source[int(i)]
        except Exception as e:  # array_record raises RuntimeError on damage, others on missing files
            return Unreadable(f"{self.where(int(i))}: {_first_line(e)}")
        return _text(record[self.field], self.where(int(i)))


class FileRecords:
    """JSON Lines or ArrayRecord files matched by a glob, in sorted path order.

    JSON Lines are indexed by line offsets once per process (16 bytes a line in memory); use
    ArrayRecord (or tfds) for corpora with hundreds of millions of documents."""

    def __init__(self, kind: str, paths: list[str], field: str, limit: int = 0):
        self.kind, self.paths, self.field = kind, paths, field
        self._open: dict[int, object] = {}  # file index -> its reader or line index, per process
        counts = [self._count(f, p) for f, p in enumerate(paths)]
        self.ends = np.cumsum(counts)
        total = int(self.ends[-1]) if counts else 0
        self.size = min(limit, total) if limit else total
        self.name = f"{kind}:{paths[0] if len(paths) == 1 else os.path.commonpath(paths)}"

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # readers and line indexes are rebuilt in each process

    def _count(self, f: int, path: str) -> int:
        if self.kind == "jsonl":  # counting is indexing: keep the index for reading
            self._open[f] = self._lines(path)
            return len(self._open[f])
        from array_record.python.array_record_module import ArrayRecordReader

        try:
            reader = ArrayRecordReader(path, "readahead_buffer_size:0")
            n = reader.num_records()
            reader.close()
        except Exception as e:
            raise DataError(f"'{path}' is not a readable ArrayRecord file ({_first_line(e)})") from None
        return n

    @staticmethod
    def _lines(path: str) -> np.ndarray:
        """Start and end offsets [n, 2] of the non-empty lines of a file."""
        data = np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
        newlines = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [len(data)]])
        keep = ends > starts
        return np.stack([starts[keep], ends[keep]], axis=1)

    def __len__(self) -> int:
        return self.size

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.ends, i, side="right"))
        return f, i - (int(self.ends[f - 1]) if f else 0)

    def where(self, i: int) -> str:
        f, j = self._locate(i)
        unit = "line" if self.kind == "jsonl" else "record"
        return f"{unit} {j + 1 if self.kind == 'jsonl' else j} of {self.paths[f]}"

    def __getitem__(self, i: int) -> str | Unreadable:
        i = int(i)
        f, j = self._locate(i)
        try:
            raw = self._read(f, j)
        except Exception as e:
            return Unreadable(f"{self.where(i)}: {_first_line(e)}")
        if self.kind == "array_record" and not raw.lstrip()[:1] == b"{":
            return _text(raw, self.where(i))
        try:
            obj = json.loads(raw)
        except ValueError as e:
            return Unreadable(f"{self.where(i)}: not JSON ({e})")
        if not isinstance(obj, dict) or self.field not in obj:
            return Unreadable(f"{self.where(i)}: no '{self.field}' field (data.text_field)")
        return _text(obj[self.field], self.where(i))

    def _read(self, f: int, j: int) -> bytes:
        if f not in self._open:
            if self.kind == "jsonl":
                self._open[f] = self._lines(self.paths[f])
            else:
                from array_record.python.array_record_module import ArrayRecordReader

                self._open[f] = ArrayRecordReader(self.paths[f], "readahead_buffer_size:0")
        handle = self._open[f]
        if self.kind == "array_record":
            return handle.read([j])[0]
        start, end = handle[j]
        with open(self.paths[f], "rb") as fh:
            fh.seek(int(start))
            return fh.read(int(end - start))


def _tfds_builder(name: str, data: DataConfig):
    try:
        builder = tfds.builder(name, data_dir=data.data_dir or None, file_format="array_record")
    except Exception as e:  # tfds raises DatasetNotFoundError and others with long texts
        raise DataError(
            f"data.dataset '{name}' is not a known tfds dataset ({type(e).__name__}); use '{EMBEDDED}' "
            "(local text files), a tfds name such as lm1b or c4/en, or jsonl:GLOB / array_record:GLOB"
        ) from None
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset '{name}' is not prepared under '{builder.data_dir_root}'; prepare it in "
            "array_record format (tfds build --file_format=array_record) or set data.data_dir"
        )
    return builder


def open_source(spec: str, data: DataConfig, split: str):
    """The records of ``split`` of one source spec (see the module docstring)."""
    kind, sep, pattern = spec.partition(":")
    if sep and kind in FILE_KINDS:
        if "{split}" not in pattern and split != "train":
            raise DataError(
                f"source '{spec}' has no '{{split}}' in its glob, so it has no '{split}' split; name the "
                f"split in the path, e.g. {kind}:/data/{{split}}-*.{'jsonl' if kind == 'jsonl' else 'array_record'}"
            )
        glob = os.path.expanduser(pattern.replace("{split}", split))
        paths = sorted(p for p in globlib.glob(glob, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"source '{spec}': '{glob}' matches no files")
        return FileRecords(kind, paths, data.text_field, data.max_documents)
    if spec == EMBEDDED:
        return TfdsRecords(spec, build(data.text_glob, data.data_dir), split, data.text_field, data.max_documents)
    return TfdsRecords(spec, _tfds_builder(spec, data), split, data.text_field, data.max_documents)


def source_specs(data: DataConfig) -> list[tuple[str, float]]:
    """(spec, weight) of every source: ``data.mixture``'s entries, or ``data.dataset`` alone."""
    return parse_mixture(data.mixture) if data.mixture else [(data.dataset, 1.0)]


def source_weights(data: DataConfig) -> list[float]:
    return [weight for _, weight in source_specs(data)]


def open_sources(data: DataConfig, split: str) -> list:
    return [open_source(spec, data, split) for spec, _ in source_specs(data)]


def tokenizer_dir(data: DataConfig, first) -> Path:
    """Where a trained tokenizer is cached: beside a tfds dataset, else in the tfds data dir."""
    if isinstance(first, TfdsRecords):
        return first.directory
    root = data.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    return Path(root) / "moela_tokenizers"
