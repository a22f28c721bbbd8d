"""The generation engine: one jitted step over a ragged batch, driven by the scheduler.

``Engine.run(requests)`` yields each request's ``Result`` as soon as it finishes. Every step
the scheduler picks chunks (decode tokens, prefill chunks); the host packs them into a
``Batch`` padded to power-of-two buckets (tokens T, sequences S, page-table width M), so a
handful of compiled shapes serve any mix of requests; the device runs the model's own forward
over the batch (``Decoder.serve_step``: the attention layers write the new cache rows and read
the paged cache), samples one token per sequence that reached its end, and returns those
tokens. The pool is donated to the step, so the cache is updated in place. The engine holds no
model math of its own. With ``serve.speculative_tokens`` > 0 the step also verifies the drafts
each sequence carries and proposes the next ones with the model's MTP module
(``inference.speculative``), so a step may return several tokens of one sequence.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moela.configs.schema import Config
from moela.inference.pages import PageAllocator
from moela.inference.sampling import SamplingArrays, sample
from moela.inference.scheduler import Chunk, Request, Scheduler, Sequence
from moela.inference.speculative import Drafts, speculative_step
from moela.model.cache import PagedCache, init_pool, kv_heads
from moela.model.runtime import ONE_DEVICE, Partitioner, Runtime
from moela.model.transformer import Decoder, to_serving_layout


@dataclasses.dataclass
class Result:
    id: str
    index: int
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the context)
    prompt_tokens: int
    ttft_s: float
    tpot_s: float | None  # mean time per output token after the first
    preemptions: int
    token_times: list[float]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One engine step's packed ragged batch (host-built, bucket-padded)::

    tokens, positions, slots   [T]    token ids, positions, cache slots (-1: padding)
    kv_lens                    [S]    cache length per sequence after this step's tokens
    page_table                 [S, M]
    cu_q_lens                  [S+1]
    num_seqs                   []     sequences in use
    last_index                 [S]    packed index of each sequence's last token this step
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    last_index: jax.Array

    def cache(self, pool) -> PagedCache:
        """The model's view of the cache for this step."""
        return PagedCache(pool, self.slots, self.kv_lens, self.page_table, self.cu_q_lens, self.num_seqs)


def bucket(n: int, lo: int = 1) -> int:
    """The power of two >= max(n, lo): the padded size of one batch dimension. The engine's
    floors (8 tokens, 4 sequences, 4 pages) cost a decode step almost nothing (it is bound by
    reading the weights) and save compilations as batches shrink."""
    return 1 << (max(int(n), lo, 1) - 1).bit_length()


def _device_step(state, pool, batch: Batch, sampling: SamplingArrays, *, graphdef, rt: Runtime):
    """The model's serving forward + sampling over one packed batch; (tokens [S], pool)."""
    model = nnx.merge(graphdef, state)
    logits_sn, cache = model.serve_step(batch.tokens, batch.positions, batch.cache(pool), batch.last_index, rt=rt)
    return sample(logits_sn, sampling), cache.pool


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The jitted step for one model graph and runtime. Engines over equal graphs may share one
    (pass ``step=`` to ``Engine``): its compiled shapes are kept, and binding the graph once
    spares hashing it at every call (~2 ms on the bench preset)."""

    graphdef: nnx.GraphDef
    rt: Runtime
    fn: Callable
    speculative: Callable  # the verify-accept-draft step (compiled on first use)

    @classmethod
    def of(cls, graphdef, rt: Runtime) -> CompiledStep:
        return cls(
            graphdef,
            rt,
            jax.jit(partial(_device_step, graphdef=graphdef, rt=rt), donate_argnums=(1,)),
            jax.jit(partial(speculative_step, graphdef=graphdef, rt=rt), donate_argnums=(1, 2)),
        )


class Engine:
    """Paged, continuously batched generation for one ``Decoder``.

    ``tokenizer`` (optional) decodes text for stop strings and results. The model runs under
    ``cfg.runtime``; a mesh's ``partitioner`` (``moela.parallel.layout.Layout``) shards the weights
    and the cache over the mesh (tensor parallel: heads, MLP, vocab). The engine keeps its own copy
    of the weights in the serving layout (``to_serving_layout``): drop the model afterwards to hold
    them once (serve.py does). ``step`` shares another engine's compiled step (same graph and
    runtime)."""

    def __init__(
        self,
        model: Decoder,
        cfg: Config,
        tokenizer=None,
        partitioner: Partitioner = ONE_DEVICE,
        step: CompiledStep | None = None,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rt = Runtime(cfg.runtime, partitioner)
        s = cfg.serve
        self.page_size, self.max_seq_len = s.page_size, cfg.model.max_seq_len
        self.allocator = PageAllocator(s.num_pages, s.page_size)
        self.k = s.speculative_tokens
        if self.k and model.mtp is None:
            raise ValueError(
                f"serve.speculative_tokens = {self.k} drafts with the model's MTP module, but this model has none "
                "(model.mtp_depth = 0); valid: serve.speculative_tokens=0, or a model trained or imported with MTP"
            )
        self.scheduler = Scheduler(self.allocator, s.max_batch, s.max_batched_tokens, lookahead=max(self.k - 1, 0))
        eos = s.eos_id if s.eos_id >= 0 else (tokenizer.eos_id if tokenizer is not None else -1)
        self.eos_id = eos
        # the pool [L, N, P, G, W]: a GQA cache's kv heads split like the model's, MLA's one replicated
        heads = "act_kv_heads" if kv_heads(cfg.model) > 1 else None
        pool_sharding = self.rt.partitioner.sharding((None, None, None, heads, None))
        extra = 1 if self.k else 0  # the draft module's cache layer
        self.pool = init_pool(cfg.model, s.num_pages, s.page_size, s.cache_dtype, pool_sharding, extra_layers=extra)
        # the drafts' distributions, one row per running sequence (sampled requests need them to verify)
        self.q_buf = jnp.zeros((s.max_batch, self.k, cfg.model.vocab_size), jnp.float32) if self.k else None
        self._q_rows: dict[int, int] = {}
        self.speculation = {"verify_steps": 0, "emitted": 0, "proposed": [0] * self.k, "accepted": [0] * self.k}
        graphdef, self.weights = nnx.split(to_serving_layout(model))
        if step is not None and (step.graphdef != graphdef or step.rt != self.rt):
            raise ValueError("step= was compiled for another model graph or runtime")
        self.compiled = step or CompiledStep.of(graphdef, self.rt)
        self._next_id = 0
        self.steps = 0
        self.compiled_shapes: set[tuple[int, int, int]] = set()

    # -- the device step ------------------------------------------------------------------
    def pack(self, chunks: list[Chunk]) -> tuple[Batch, SamplingArrays]:
        """The padded device batch for ``chunks`` (pages already reserved)."""
        total = sum(c.length for c in chunks)
        t, s = bucket(total, 8), bucket(len(chunks), 4)
        m = bucket(max(len(self.allocator.pages[c.seq.seq_id]) for c in chunks), 4)
        tokens, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        kv_lens, last = np.zeros(s, np.int32), np.zeros(s, np.int32)
        page_table = np.zeros((s, m), np.int32)
        cu = np.full(s + 1, total, np.int32)
        params = SamplingArrays.greedy(s)
        at = 0
        for i, c in enumerate(chunks):
            seq, req = c.seq, c.seq.request
            stop = c.start + c.length
            tokens[at : at + c.length] = c.tokens
            positions[at : at + c.length] = np.arange(c.start, stop)
            slots[at : at + c.length] = self.allocator.slots(seq.seq_id, c.start, stop)
            pages = self.allocator.pages[seq.seq_id]
            page_table[i, : len(pages)] = pages
            kv_lens[i], cu[i], last[i] = stop, at, at + c.length - 1
            params.temperature[i], params.top_k[i], params.top_p[i] = req.temperature, req.top_k, req.top_p
            params.seed[i], params.index[i] = np.uint32(req.seed % 2**32), len(seq.generated)
            at += c.length
        cu[len(chunks)] = total
        self.compiled_shapes.add((t, s, m))
        batch = Batch(tokens, positions, slots, kv_lens, page_table, cu, np.int32(len(chunks)), last)
        return batch, params

    def pack_drafts(self, chunks: list[Chunk], batch: Batch) -> Drafts:
        """The speculative inputs of ``chunks`` (``inference.speculative.Drafts``)."""
        s = batch.kv_lens.shape[0]
        running = {seq.seq_id for seq in self.scheduler.running}
        for seq_id in [i for i in self._q_rows if i not in running]:  # finished or preempted
            del self._q_rows[seq_id]
        free = sorted(set(range(self.q_buf.shape[0])) - set(self._q_rows.values()))
        tokens, count = np.zeros((s, self.k), np.int32), np.zeros(s, np.int32)
        follow, limit, samples = np.zeros(s, np.int32), np.zeros(s, np.int32), np.zeros(s, bool)
        rows = np.full(s, self.q_buf.shape[0], np.int32)
        for i, c in enumerate(chunks):
            seq = c.seq
            tokens[i, : c.drafts], count[i] = seq.drafts[: c.drafts], c.drafts
            samples[i], limit[i] = c.samples, seq.limit
            if not c.samples:
                follow[i] = seq.tokens[c.start + c.length]
            if seq.seq_id not in self._q_rows:
                self._q_rows[seq.seq_id] = free.pop(0)
            rows[i] = self._q_rows[seq.seq_id]
        base_last = np.asarray(batch.last_index) - count
        return Drafts(tokens, count, base_last.astype(np.int32), follow, samples, limit, rows)

    def step(self) -> list[tuple[Sequence, int]]:
        """Run one step; returns (sequence, new token) for every token a sequence gained, in order."""
        chunks = self.scheduler.plan()
        if not chunks:
            raise RuntimeError(
                "no sequence can run: the page pool is too small for the oldest waiting request "
                f"({self.allocator.free} of {self.allocator.num_pages} pages free)"
            )
        batch, params = self.pack(chunks)
        self.steps += 1
        if self.k:
            return self._speculative(chunks, batch, params)
        tokens_dev, self.pool = self.compiled.fn(self.weights, self.pool, batch, params)
        tokens = np.asarray(tokens_dev)
        self.scheduler.advance(chunks)
        return [(c.seq, int(tokens[i])) for i, c in enumerate(chunks) if c.samples]

    def _speculative(self, chunks: list[Chunk], batch: Batch, params: SamplingArrays) -> list[tuple[Sequence, int]]:
        drafts = self.pack_drafts(chunks, batch)
        accepted, drawn, proposed, self.pool, self.q_buf = self.compiled.speculative(
            self.weights, self.pool, self.q_buf, batch, params, drafts
        )
        accepted, drawn, proposed = (np.asarray(a) for a in (accepted, drawn, proposed))
        self.scheduler.advance(chunks, [int(a) for a in accepted])
        out, stats = [], self.speculation
        for i, c in enumerate(chunks):
            if not c.samples:
                continue
            seq, a = c.seq, int(accepted[i])
            if c.drafts:
                stats["verify_steps"] += 1
                stats["emitted"] += a + 1
                for j in range(c.drafts):
                    stats["proposed"][j] += 1
                    stats["accepted"][j] += int(j < a)
            out += [(seq, t) for t in seq.drafts[:a]] + [(seq, int(drawn[i]))]
            # the new drafts; d_j scores position b + 1 + j (b: the last accepted position)
            b = c.start + c.length - c.drafts + a - 1
            seq.drafts = [int(t) for t in proposed[i][: max(0, min(self.k, seq.limit - b - 2))]]
        return out

    def speculation_summary(self) -> dict | None:
        """Speculative decoding so far: drafts per step, the acceptance rate of each draft position
        (accepted / proposed), and tokens emitted per verification step (1 + accepted drafts);
        None when speculation is off."""
        if not self.k:
            return None
        s = self.speculation
        return {
            "speculative_tokens": self.k,
            "verify_steps": s["verify_steps"],
            "acceptance_rate": [round(a / p, 4) if p else None for a, p in zip(s["accepted"], s["proposed"])],
            "tokens_per_verify_step": round(s["emitted"] / s["verify_steps"], 4) if s["verify_steps"] else None,
        }

    # -- requests -------------------------------------------------------------------------
    def check(self, req: Request) -> str | None:
        """Why ``req`` cannot run here, or None."""
        n = len(req.tokens)
        if n == 0:
            return "empty prompt"
        if n >= self.max_seq_len:
            return f"prompt of {n} tokens does not fit the model's context of {self.max_seq_len} tokens"
        vocab = self.cfg.model.vocab_size
        bad = [(i, t) for i, t in enumerate(req.tokens) if not 0 <= t < vocab]
        if bad:
            where = ", ".join(f"{t} at position {i}" for i, t in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return f"token ids must lie in the vocabulary [0, {vocab}); got {where}{more}"
        need = self.allocator.pages_for(min(n + req.max_tokens, self.max_seq_len))
        if need > self.allocator.num_pages:
            return (
                f"prompt + max_tokens needs {need} pages of {self.page_size} tokens but the cache has "
                f"{self.allocator.num_pages} (raise serve.num_pages or lower max_tokens)"
            )
        return None

    def submit(self, req: Request) -> Sequence:
        problem = self.check(req)
        if problem:
            raise ValueError(f"request {req.id!r}: {problem}")
        limit = min(len(req.tokens) + req.max_tokens, self.max_seq_len)
        seq = Sequence(self._next_id, req, arrival=self._next_id, limit=limit)
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def _text(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    def _finished(self, seq: Sequence, token: int) -> tuple[str, list[int], str | None] | None:
        """Append ``token``; (reason, tokens, text) when the sequence is done, else None."""
        req = seq.request
        if token == self.eos_id:
            return "stop", list(seq.generated), self._text(seq.generated)
        seq.generated.append(token)
        if req.stop and self.tokenizer is not None:
            text = self._text(seq.generated)
            hits = [text.find(s) for s in req.stop if s and s in text]
            if hits:
                return "stop", list(seq.generated), text[: min(hits)]
        if len(seq.generated) >= req.max_tokens or seq.length >= self.max_seq_len:
            return "length", list(seq.generated), self._text(seq.generated)
        return None

    def run(self, requests: Iterable[Request], on_step: Callable[["Engine"], None] | None = None) -> Iterator[Result]:
        """Generate for all ``requests``; yields each ``Result`` when its request finishes."""
        for req in requests:
            self.submit(req)
        while self.scheduler.busy:
            finished: set[int] = set()
            for seq, token in self.step():
                if seq.seq_id in finished:  # tokens a step accepted past the sequence's end
                    continue
                now = time.perf_counter()
                seq.token_times.append(now)
                done = self._finished(seq, token)
                if done is None:
                    continue
                reason, tokens, text = done
                finished.add(seq.seq_id)
                self.scheduler.finish(seq)
                times = seq.token_times
                tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
                yield Result(
                    seq.request.id,
                    seq.request.index,
                    tokens,
                    text,
                    reason,
                    len(seq.request.tokens),
                    times[0] - seq.submitted,
                    tpot,
                    seq.preemptions,
                    times,
                )
            if on_step is not None:
                on_step(self)

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """All results, in the order of ``requests``."""
        requests = list(requests)
        order = {r.id: i for i, r in enumerate(requests)}
        return sorted(self.run(requests), key=lambda r: order[r.id])


def greedy_reference(model, prompt: list[int], max_tokens: int, eos_id: int = -1) -> list[int]:
    """A plain full-recompute greedy loop (no cache): the model over the whole sequence for
    every token. What the engine must reproduce, and the no-cache baseline of ``bench/serve.py``.
    The sequence is padded to a fixed length (causal: padding after the last token changes
    nothing before it), so the loop compiles once."""
    length = -(-(len(prompt) + max_tokens) // 16) * 16
    tokens = np.zeros((1, length), np.int32)
    tokens[0, : len(prompt)] = prompt
    n, out = len(prompt), []
    for _ in range(max_tokens):
        token = int(_next_token(model, jnp.asarray(tokens), n - 1))
        if token == eos_id:
            break
        out.append(token)
        tokens[0, n] = token
        n += 1
    return out


@nnx.jit
def _next_token(model, tokens_bt, last):
    return jnp.argmax(model(tokens_bt)[0][0, last])
