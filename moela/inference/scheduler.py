"""Continuous batching on the host: which tokens of which sequences run in the next step.

Each step has a budget of ``max_tokens`` tokens and ``max_seqs`` sequences. Running sequences
go first, oldest first, each taking all the tokens it still has to compute (1 for a decoding
sequence, the rest of its prompt for one in prefill) up to what is left of the budget, so a
long prompt is prefilled in chunks across steps while other sequences keep decoding. Then
waiting sequences are admitted in arrival order while budget, sequence slots and free pages
last. A finished sequence frees its pages at once, so a waiting one can join the next step.

When a running sequence needs a page and none is free, the *newest* running sequence is
preempted: its pages are freed and it goes back to the front of the queue with the tokens it
has generated, to be recomputed (re-prefilled over prompt + generated tokens) when pages
free up. Recomputation replays exactly (sampling draws depend only on seed and token
index), so a preempted request's output is the one it would have had (with speculative decoding:
exactly for greedy requests, in distribution for sampled ones, whose draws depend on the drafts).

With speculative decoding a decoding sequence also carries the drafts proposed for it: its chunk
is its last token and the drafts, trimmed to the step's token budget, and its pages cover the
positions the next drafts will be written at (``lookahead``).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque

from moela.inference.pages import PageAllocator


@dataclasses.dataclass
class Request:
    """One generation request (already tokenised and validated)."""

    id: str
    tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    index: int = 0  # position in the input (outputs are written in this order)


@dataclasses.dataclass
class Sequence:
    """A request in flight: its tokens so far and how many have rows in the cache."""

    seq_id: int
    request: Request
    arrival: int
    generated: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    preemptions: int = 0
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    token_times: list[float] = dataclasses.field(default_factory=list)
    drafts: list[int] = dataclasses.field(default_factory=list)  # speculative: proposed next tokens
    limit: int = 0  # the longest the sequence may grow (prompt + max_tokens, within the context)

    @property
    def tokens(self) -> list[int]:
        return self.request.tokens + self.generated

    @property
    def length(self) -> int:
        return len(self.request.tokens) + len(self.generated)

    @property
    def remaining(self) -> int:
        return self.length - self.computed


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Positions ``start .. start + length - 1`` of ``seq`` run this step, the last ``drafts`` of
    them the sequence's drafts; ``samples`` when the chunk reaches the sequence's end (drafts
    included), so its logits give the next token."""

    seq: Sequence
    start: int
    length: int
    drafts: int = 0

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.seq.length + self.drafts

    @property
    def tokens(self) -> list[int]:
        return (self.seq.tokens + self.seq.drafts[: self.drafts])[self.start : self.start + self.length]


class Scheduler:
    """``lookahead``: pages a sampling chunk reserves past its end (speculative decoding writes
    the draft module's rows there), never past the sequence's ``limit``."""

    def __init__(self, allocator: PageAllocator, max_seqs: int, max_tokens: int, lookahead: int = 0):
        if max_seqs < 1 or max_tokens < 1:
            raise ValueError(f"a step needs room for a sequence and a token; got {max_seqs} seqs, {max_tokens} tokens")
        self.allocator, self.max_seqs, self.max_tokens = allocator, max_seqs, max_tokens
        self.lookahead = lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.seq_id)
        seq.computed = 0
        seq.drafts = []
        seq.preemptions += 1
        self.preemptions += 1
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    def plan(self) -> list[Chunk]:
        """The next step's chunks (pages reserved for them), or [] when nothing can run."""
        budget, chunks = self.max_tokens, []
        i = 0
        while i < len(self.running) and budget > 0 and len(chunks) < self.max_seqs:
            seq = self.running[i]
            del seq.drafts[max(0, budget - seq.remaining) :]  # drafts that do not fit the budget
            length = min(seq.remaining + len(seq.drafts), budget)
            while not self.allocator.can_hold(seq.seq_id, self._rows(seq, seq.computed + length)):
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            if seq not in self.running:
                break  # it was the newest: everything after it is gone too
            self.allocator.reserve(seq.seq_id, self._rows(seq, seq.computed + length))
            chunks.append(Chunk(seq, seq.computed, length, len(seq.drafts)))
            budget -= length
            i += 1
        while self.waiting and budget > 0 and len(chunks) < self.max_seqs:
            seq = self.waiting[0]
            length = min(seq.remaining, budget)
            if not self.allocator.can_hold(seq.seq_id, self._rows(seq, length)):
                break
            self.waiting.popleft()
            self.allocator.reserve(seq.seq_id, self._rows(seq, length))
            self.running.insert(bisect.bisect([s.arrival for s in self.running], seq.arrival), seq)
            chunks.append(Chunk(seq, 0, length))
            budget -= length
        return chunks

    def _rows(self, seq: Sequence, end: int) -> int:
        """Cache rows a chunk ending at ``end`` needs: past it the lookahead when it samples."""
        if not self.lookahead or end < seq.length + len(seq.drafts):
            return end
        return max(end, min(end + self.lookahead, seq.limit))

    def advance(self, chunks: list[Chunk], accepted: list[int] | None = None) -> None:
        """Record that ``chunks`` ran: their rows are now in the cache, except those of drafts that
        were not accepted (``accepted[i]`` of chunk i's drafts were)."""
        for i, chunk in enumerate(chunks):
            rejected = chunk.drafts - (accepted[i] if accepted is not None else 0)
            chunk.seq.computed = chunk.start + chunk.length - rejected

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.release(seq.seq_id)
