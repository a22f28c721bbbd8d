"""Streaming training batches with grain: sharded, tokenised and packed on the fly, resumable.

The record order is one infinite sequence per run. Each source is a grain ``MapDataset``
shuffled per epoch (grain's index shuffle: O(1) memory, a different permutation every epoch)
and repeated; several sources are mixed by weight (``MapDataset.mix``, deterministic). Global
position g of that sequence goes to shard ``g % S``: shards are disjoint, their union within
an epoch is every record, and when S does not divide the record count the shards' epoch
boundaries differ by at most one record (nothing is dropped or repeated).

A shard is a stream of packed rows and owns a fixed block of ``B / S`` rows of every global
batch. Each process runs the shards whose rows it holds (``shards_for``), reading only their
records; grain worker processes (``data.workers``) read and tokenise documents ahead, and the
packing runs after them in the training process, so the rows do not depend on the worker
count. A shard's state is a few integers: the position and offset of the document its next
row starts in (plus the row-shuffle window and tokens per source). The checkpoint stores every
shard's state, so a run resumes exactly, on any number of processes and workers: the shard
count S is part of the run, not of the machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moela.data.packing import Packer, Rows, concat
from moela.data.sources import Unreadable
from moela.data.text_builder import DataError

STATE_VERSION = 1


def load_grain():
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; moela's CLIs parse their own arguments
        flags.FLAGS.mark_as_parsed()
    return grain


class Tokenise:
    """Text -> (source index, int32 tokens); picklable for worker processes (the model is loaded
    in each process on first use). Unreadable records pass through untouched."""

    def __init__(self, source: int, model_path: str | None):
        self.source, self.model_path, self._sp = source, model_path, None

    def __getstate__(self):
        return {**self.__dict__, "_sp": None}

    def __call__(self, text):
        if isinstance(text, Unreadable) or self.model_path is None:
            return text
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        return self.source, np.asarray(self._sp.encode(text), np.int32)


def _seed(seed: int, source: int) -> int:
    return (seed * 1_000_003 + source * 7919) % 2**32


def ordered(sources: list, weights: list[float], seed: int, model_path: str | None):
    """The run's infinite record sequence as a grain MapDataset of (source, tokens), or of text
    when ``model_path`` is None."""
    grain = load_grain()
    for src in sources:
        if len(src) == 0:
            raise DataError(f"source '{src.name}' holds no records")
    parts = [
        grain.MapDataset.source(src).shuffle(seed=_seed(seed, i)).repeat().map(Tokenise(i, model_path))
        for i, src in enumerate(sources)
    ]
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def documents(dataset, shard: int, shards: int, start: int, workers: int, prefetch: int):
    """Iterator over shard ``shard`` of ``shards`` of ``dataset`` from its position ``start``."""
    grain = load_grain()
    ds = dataset[shard::shards][start:] if shards > 1 or start else dataset
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if workers == 0 else 1, prefetch_buffer_size=prefetch))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    return iter(it)


def checked(docs):
    """Documents as they come, with an unreadable record turned into one DataError."""
    for doc in docs:
        if isinstance(doc, Unreadable):
            raise DataError(f"unreadable record: {doc.message}")
        yield doc


class ShardStream:
    """Packed rows of one shard; ``window`` > 0 shuffles rows within consecutive windows.

    The next window is packed by a background thread while the current one is served, so a
    window's tokenising and packing never stalls the training step."""

    def __init__(
        self,
        open_docs,
        shard: int,
        seq_len: int,
        tok,
        num_sources: int,
        seed: int,
        window: int,
        state: dict | None = None,
    ):
        self.shard, self.seed, self.window = shard, seed, window
        state = state or {"position": 0, "offset": 0, "block": 0, "served": 0, "tokens": [0] * num_sources}
        self.tokens = np.asarray(state["tokens"], np.int64)
        self.docs = open_docs(shard, state["position"])
        self.packer = Packer(
            checked(self.docs),
            seq_len,
            tok.eos_id,
            tok.bos_id,
            tok.pad_id,
            position=state["position"],
            offset=state["offset"],
            num_sources=num_sources,
        )
        self.block, self.served, self.pending = state["block"], state["served"], None
        if window:
            self.block_start, self.buffer = self._pack_window(self.block)
            self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"moela-shard{shard}")
            self.pending = self.pool.submit(self._pack_window, self.block + 1)

    def _pack_window(self, block: int) -> tuple[dict, list]:
        """(packer state at its start, rows) of window ``block``, shuffled by (seed, shard, block)."""
        start = self.packer.state()
        rows = [self.packer.row() for _ in range(self.window)]
        order = np.random.default_rng([self.seed, self.shard, block]).permutation(self.window)
        return start, [rows[i] for i in order]

    def _next(self) -> tuple[Rows, np.ndarray]:
        if not self.window:
            return self.packer.row()
        if self.served == self.window:
            self.block, self.served = self.block + 1, 0
            self.block_start, self.buffer = self.pending.result()
            self.pending = self.pool.submit(self._pack_window, self.block + 1)
        self.served += 1
        return self.buffer[self.served - 1]

    def rows(self, n: int) -> Rows:
        out = []
        for _ in range(n):
            row, counts = self._next()
            self.tokens += counts
            out.append(row)
        return concat(out)

    def state(self) -> dict:
        where = self.block_start if self.window else self.packer.state()
        return {**where, "block": self.block, "served": self.served, "tokens": [int(t) for t in self.tokens]}

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pool.shutdown(wait=False)
        if hasattr(self.docs, "close"):
            self.docs.close()


def shards_for(span: tuple[int, int], global_batch: int, shards: int) -> list[tuple[int, slice]]:
    """(shard, rows of that shard's block this process holds) for every shard overlapping ``span``."""
    per = global_batch // shards
    out = []
    for s in range(shards):
        lo, hi = max(span[0], s * per), min(span[1], (s + 1) * per)
        if lo < hi:
            out.append((s, slice(lo - s * per, hi - s * per)))
    return out


class TrainStream:
    """This process's rows of every global batch: ``next()`` returns them as a batch dict."""

    def __init__(
        self,
        sources: list,
        weights: list[float],
        tok,
        *,
        global_batch: int,
        seq_len: int,
        seed: int,
        span: tuple[int, int],
        shards: int,
        workers: int = 0,
        prefetch: int = 64,
        window: int = 0,
        state: dict | None = None,
    ):
        if global_batch % shards:
            raise DataError(f"{shards} data shards cannot split a global batch of {global_batch} rows")
        if state is not None and state["shards"] != shards:
            raise DataError(f"the saved data state has {state['shards']} shards, not {shards}")
        if state is not None and state["window"] != window:
            raise DataError(
                f"data.shuffle_rows={window}, but this run was streamed with row windows of {state['window']}; "
                f"set data.shuffle_rows={state['window']} to resume it exactly, or choose another train.out_dir"
            )
        self.names, self.window = [src.name for src in sources], window
        self.global_batch, self.shards, self.per = global_batch, shards, global_batch // shards
        dataset = ordered(sources, weights, seed, tok.path)

        def open_docs(shard: int, position: int):
            return documents(dataset, shard, shards, position, workers, prefetch)

        self.slices = dict(shards_for(span, global_batch, shards))
        self.streams = {
            s: ShardStream(
                open_docs, s, seq_len, tok, len(sources), seed, window, state["streams"][s] if state else None
            )
            for s in self.slices
        }

    def next(self) -> dict[str, np.ndarray]:
        rows = [self.streams[s].rows(self.per).take(self.slices[s]) for s in sorted(self.streams)]
        return concat(rows).as_batch()

    def state(self) -> dict:
        """This process's shards' states (``gather_state`` completes them across processes)."""
        return {
            "version": STATE_VERSION,
            "shards": self.shards,
            "window": self.window,
            "sources": self.names,
            "streams": {s: stream.state() for s, stream in self.streams.items()},
        }

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


FIELDS = ("position", "offset", "block", "served")


def gather_state(local: dict, num_sources: int) -> dict:
    """Every shard's state, assembled from all processes' (each shard from a process that runs it)."""
    import jax

    shards = local["shards"]
    table = np.full((shards, len(FIELDS) + num_sources), -1, np.int64)
    for s, st in local["streams"].items():
        table[s] = [st[f] for f in FIELDS] + st["tokens"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        table = np.asarray(multihost_utils.process_allgather(table)).max(axis=0)
    if (table < 0).any():
        raise DataError("some data shards are run by no process; this is a bug in the shard assignment")
    streams = [
        {**{f: int(v) for f, v in zip(FIELDS, row)}, "tokens": [int(t) for t in row[len(FIELDS) :]]} for row in table
    ]
    return {**local, "streams": streams}


def eval_batches(
    sources: list,
    weights: list[float],
    tok,
    *,
    global_batch: int,
    seq_len: int,
    batches: int,
    span: tuple[int, int],
    prefetch: int = 64,
) -> tuple[list[dict], np.ndarray]:
    """The validation split packed in its stored order (unshuffled, one pass): the first
    ``batches`` global batches, this process's rows of each, and the token counts of all their
    targets (for the unigram entropy the loss is compared with). The same on every restart and
    host count; a short last batch is padded with no-loss rows; the split may hold fewer batches."""
    grain = load_grain()
    parts = [grain.MapDataset.source(src).map(Tokenise(i, tok.path)) for i, src in enumerate(sources)]
    dataset = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    docs = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=min(prefetch, 8))))
    packer = Packer(checked(docs), seq_len, tok.eos_id, tok.bos_id, tok.pad_id, num_sources=len(sources))
    counts = np.zeros(tok.vocab_size, np.int64)
    out = []
    for _ in range(batches):
        rows = []
        for _ in range(global_batch):
            made = packer.row()
            if made is None:
                break
            rows.append(made[0])
            counts += np.bincount(made[0].targets[made[0].segment_ids > 0], minlength=tok.vocab_size)
        if not rows:
            break
        batch = concat(rows)
        if len(batch) < global_batch:  # repeat the last row with segment 0: no loss, one compiled shape
            pad = batch.take(np.full(global_batch - len(batch), len(batch) - 1))
            pad.segment_ids[:] = 0
            batch = concat([batch, pad])
        out.append(batch.take(slice(*span)).as_batch())
    if not out:
        raise DataError(f"the validation split of {', '.join(src.name for src in sources)} holds no text")
    return out, counts
