"""A small read-only safetensors reader on ``np.memmap``: zero-copy, shard by shard.

We read Hugging Face checkpoints without torch and without the ``safetensors`` package:
the format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` and one flat buffer. Memory-mapping means a
tensor's bytes are paged in only when it is converted, so a 600 GB checkpoint streams
through a host that holds one tensor at a time. bfloat16 and float8 come from ml_dtypes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()`` and ``get(name) -> np.ndarray`` (a read-only view)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"'{self.path}' is not a readable safetensors file: {e}") from None
        header.pop("__metadata__", None)
        self.header = header
        self._base = 8 + n
        self._mm = None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        meta = self.header[name]
        if meta["dtype"] not in DTYPES:
            raise SafetensorsError(
                f"tensor '{name}' in '{self.path}' has dtype {meta['dtype']}; supported: {', '.join(DTYPES)}"
            )
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = meta["data_offsets"]
        raw = self._mm[self._base + begin : self._base + end]
        return raw.view(DTYPES[meta["dtype"]]).reshape(meta["shape"])


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The shards of a checkpoint dir, in index order (``model.safetensors.index.json``) or sorted."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"no .safetensors files in '{directory}'")
    return files
