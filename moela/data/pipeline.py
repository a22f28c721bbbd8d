"""From a config to deterministic global batches.

``prepare`` opens the split, gets the tokenizer (loaded, cached, or trained on the training
split), tokenises every document once (cached next to the dataset as ``.npz``) and packs
the stream into rows. ``Batches`` then maps a step to rows: the rows of epoch e are
permuted by a generator seeded with (seed, e), and global row g = step·B + i is
``perm(g // R)[g % R]``. The global batch is therefore a pure function of (seed, step):
resuming at step k replays exactly what an uninterrupted run saw, and each process reads
only its own contiguous slice of the B rows (``process_span`` finds it from the batch
sharding; ``to_global`` assembles the global ``jax.Array`` with
``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from moela.configs.schema import Config
from moela.data import tokenizer as spm_tokenizer
from moela.data.packing import Rows, pack
from moela.data.packing import stream as packing_stream
from moela.data.sources import document, open_split
from moela.data.text_builder import DataError

TOKENS_FORMAT = 1  # bump when the cached token-stream layout changes


def _progress(prefix: str, done: int, total: int, start: float, unit: str = "docs") -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r{prefix}: {done}/{total} {unit} ({rate:,.0f} {unit}/s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def get_tokenizer(cfg: Config) -> spm_tokenizer.Tokenizer:
    """``data.tokenizer_model`` if set, else the one cached beside the dataset (trained if absent)."""
    if cfg.data.tokenizer_model:
        tok = spm_tokenizer.load(cfg.data.tokenizer_model)
    else:
        source, directory = open_split(cfg.data, "train")
        path = spm_tokenizer.cached_path(directory, cfg.model.vocab_size, cfg.data.tokenizer_type)
        if path.is_file():
            tok = spm_tokenizer.load(path)
        else:

            def lines():
                for i in range(len(source)):
                    yield from document(source[i], cfg.data.text_field).splitlines()

            start = time.perf_counter()
            tok = spm_tokenizer.train(lines(), path, cfg.model.vocab_size, cfg.data.tokenizer_type)
            print(
                f"trained a {cfg.data.tokenizer_type} tokenizer ({tok.vocab_size} pieces) in "
                f"{time.perf_counter() - start:.1f}s: {path}",
                file=sys.stderr,
            )
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {tok.vocab_size}"
        )
    return tok


def token_stream(cfg: Config, split: str, tok: spm_tokenizer.Tokenizer) -> tuple[np.ndarray, ...]:
    """(inputs, targets, doc ids) of a whole split, tokenised once and cached."""
    source, directory = open_split(cfg.data, split)
    digest = hashlib.sha256(Path(tok.path).read_bytes()).hexdigest()[:12]
    limit = cfg.data.max_documents or len(source)
    count = min(limit, len(source))
    cache = directory / f"tokens_v{TOKENS_FORMAT}_{split}_{digest}_{count}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return z["inputs"], z["targets"], z["doc_ids"]
    start = time.perf_counter()

    def encoded():
        for i in range(count):
            yield tok.encode(document(source[i], cfg.data.text_field))
            if (i + 1) % 250 == 0 or i + 1 == count:
                _progress(f"tokenising {cfg.data.dataset}/{split}", i + 1, count, start)

    stream = packing_stream(encoded(), tok.eos_id, tok.bos_id)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, inputs=stream[0], targets=stream[1], doc_ids=stream[2])
    tmp.replace(cache)
    return stream


def prepare(cfg: Config, split: str) -> tuple[Rows, spm_tokenizer.Tokenizer]:
    tok = get_tokenizer(cfg)
    inputs, targets, doc_ids = token_stream(cfg, split, tok)
    if len(inputs) == 0:
        raise DataError(f"split '{split}' of '{cfg.data.dataset}' holds no text")
    return pack(inputs, targets, doc_ids, cfg.train.seq_len, tok.pad_id), tok


class Batches:
    """Deterministic batches over packed rows: ``local(step, span)`` is one process's slice of step's batch."""

    def __init__(self, rows: Rows, global_batch: int, seed: int):
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the global batch at ``step`` (a pure function of seed and step)."""
        g = step * self.global_batch + np.arange(self.global_batch)
        n = len(self.rows)
        return np.asarray([self._perm(int(e))[r] for e, r in zip(g // n, g % n)], np.int64)

    def local(self, step: int, span: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of step's global batch (default: all of it); see ``process_span``."""
        start, stop = span or (0, self.global_batch)
        return self.rows.take(self.indices(step)[start:stop]).as_batch()


def eval_batch(rows: Rows, start: int, batch: int, span: tuple[int, int]) -> dict[str, np.ndarray]:
    """Rows start .. start+batch-1 of a split, always ``batch`` rows: past the end, rows are
    repeated with segment id 0 (no loss). Returns the slice ``span`` of that batch."""
    idx = np.arange(start, start + batch)
    picked = rows.take(np.minimum(idx, len(rows) - 1))
    picked.segment_ids[idx >= len(rows)] = 0
    return picked.take(slice(*span)).as_batch()


def process_span(sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """[start, stop) of the rows of a global batch of ``shape`` this process's devices hold under ``sharding``.

    Each process loads only those rows; they must be contiguous (``jax.make_mesh`` keeps a
    host's devices together along ``data``)."""
    global_batch = shape[0]
    covered = sorted(
        {
            (sl[0].start or 0, global_batch if sl[0].stop is None else sl[0].stop)
            for sl in sharding.addressable_devices_indices_map(shape).values()
        }
    )
    start, stop = covered[0][0], max(end for _, end in covered)
    reached = start
    for lo, hi in covered:
        if lo > reached:
            raise DataError(
                f"this process's devices hold non-contiguous batch rows {covered}; "
                "build the mesh with parallel.mesh.build_mesh"
            )
        reached = max(reached, hi)
    return start, stop


def to_global(local: dict[str, np.ndarray], sharding, global_batch: int) -> dict:
    """The global batch as ``jax.Array``s from this process's rows (see ``process_span``).

    When the length axis is split over devices of several processes (sequence parallelism
    across hosts), each process passes on only the positions its devices hold."""
    import jax

    out = {}
    for k, v in local.items():
        shape = (global_batch,) + v.shape[1:]
        if v.ndim > 1:
            index = sharding.addressable_devices_indices_map(shape).values()
            lo = min(ix[1].start or 0 for ix in index)
            hi = max(shape[1] if ix[1].stop is None else ix[1].stop for ix in index)
            v = v[:, lo:hi]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def unigram_entropy(targets: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
