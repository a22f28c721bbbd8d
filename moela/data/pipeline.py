"""From a config to this process's rows of deterministic global batches.

``get_tokenizer`` loads ``data.tokenizer_model``, or the tokenizer cached for these sources,
or trains one on a bounded, shuffled sample of the training records. ``train_stream`` and
``validation`` build the streaming loader (``moela.data.stream``) for a process that holds
rows [start, stop) of every global batch (``process_span`` finds them from the batch
sharding); ``to_global`` assembles the global ``jax.Array`` with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import time

import numpy as np

from moela.configs.schema import Config
from moela.data import tokenizer as spm_tokenizer
from moela.data.sources import Unreadable, open_sources, source_specs, source_weights, tokenizer_dir
from moela.data.stream import TrainStream, eval_batches, load_grain, ordered
from moela.data.text_builder import DataError

TOKENIZER_MAX_CHARS = 20_000_000  # with data.tokenizer_sentences, bounds a tokenizer's training time and memory
TOKENIZER_SEED = 0  # the sample's order: a cached tokenizer depends on the sources, not on train.seed


def tokenizer_path(cfg: Config, first_source):
    """Where the tokenizer trained for these sources, vocabulary and sample size is cached."""
    d = cfg.data
    key = "|".join(
        [f"{spec}:{w}" for spec, w in source_specs(d)] + [d.text_glob, str(d.max_documents), str(d.tokenizer_sentences)]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    name = f"tokenizer_{d.tokenizer_type}_{cfg.model.vocab_size}_{digest}.model"
    return tokenizer_dir(d, first_source) / name


def sample_lines(cfg: Config, sources: list):
    """Non-empty lines of the training records in a shuffled order (TOKENIZER_SEED): at most
    ``data.tokenizer_sentences`` lines and TOKENIZER_MAX_CHARS characters, at most one epoch."""
    weights = source_weights(cfg.data)
    read = load_grain().ReadOptions(num_threads=2, prefetch_buffer_size=8)  # whole files can be large records
    records = iter(ordered(sources, weights, TOKENIZER_SEED, None).to_iter_dataset(read))
    budget = sum(len(src) for src in sources)
    lines = chars = 0
    for text in itertools.islice(records, budget):
        if isinstance(text, Unreadable):
            raise DataError(f"unreadable record: {text.message}")
        for line in text.splitlines():
            if not line.strip():
                continue
            if lines >= cfg.data.tokenizer_sentences or chars + len(line) > TOKENIZER_MAX_CHARS:
                return
            lines, chars = lines + 1, chars + len(line)
            yield line


def get_tokenizer(cfg: Config, sources: list | None = None) -> spm_tokenizer.Tokenizer:
    """``data.tokenizer_model`` if set, else the one cached for these sources (trained if absent)."""
    if cfg.data.tokenizer_model:
        tok = spm_tokenizer.load(cfg.data.tokenizer_model)
    else:
        sources = sources or open_sources(cfg.data, "train")
        path = tokenizer_path(cfg, sources[0])
        if path.is_file():
            tok = spm_tokenizer.load(path)
        else:
            start = time.perf_counter()
            lines = list(sample_lines(cfg, sources))  # bounded; read first so a bad record is our error
            tok = spm_tokenizer.train(lines, path, cfg.model.vocab_size, cfg.data.tokenizer_type)
            print(
                f"trained a {cfg.data.tokenizer_type} tokenizer ({tok.vocab_size} pieces) on at most "
                f"{cfg.data.tokenizer_sentences:,} sampled lines in {time.perf_counter() - start:.1f}s: {path}",
                file=sys.stderr,
            )
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {tok.vocab_size}"
        )
    return tok


def default_shards(span: tuple[int, int], global_batch: int) -> int:
    """One shard per distinct block of batch rows a process holds (the processes' spans are equal)."""
    return global_batch // (span[1] - span[0])


def train_stream(cfg: Config, tok, sources: list, span: tuple[int, int], shards: int, state=None) -> TrainStream:
    d, t = cfg.data, cfg.train
    return TrainStream(
        sources,
        source_weights(d),
        tok,
        global_batch=t.global_batch_size,
        seq_len=t.seq_len,
        seed=t.seed,
        span=span,
        shards=shards,
        workers=d.workers,
        prefetch=d.prefetch,
        window=d.shuffle_rows,
        state=state,
    )


def validation(cfg: Config, tok, span: tuple[int, int]) -> tuple[list[dict], np.ndarray]:
    """This process's rows of the fixed validation batches, and the token counts of their targets."""
    d, t = cfg.data, cfg.train
    sources = open_sources(d, d.validation_split)
    return eval_batches(
        sources,
        source_weights(d),
        tok,
        global_batch=t.global_batch_size,
        seq_len=t.seq_len,
        batches=t.eval_batches,
        span=span,
        prefetch=d.prefetch,
    )


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


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of token frequencies ``counts``: the loss of a model that ignores context."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
