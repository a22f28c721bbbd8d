"""Random ragged batches over a paged cache, shared by the paged-attention tests.

A case is a packed batch of sequences, each with its cache length and the number of its
last positions that are queries: decode (1), chunks after cached context, whole prompts.
Pages are dealt from a shuffled pool; every row no sequence owns is NaN (and so is the tail
of each last page), and page-table entries past a sequence's pages point at NaN pages or
out of range, so a kernel that reads what it should not shows NaN in its output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moela.kernels import reference as dense
from moela.kernels.paged import RowFormat


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [T, H, K]
    pool: np.ndarray  # [L, N, P, G, W]
    kv_lens: np.ndarray  # [S]
    page_table: np.ndarray  # [S, M]
    cu_q_lens: np.ndarray  # [S + 1]
    num_seqs: int
    layer: int
    fmt: RowFormat
    scale: float

    def args(self):
        return (self.q, self.pool, self.kv_lens, self.page_table, self.cu_q_lens, self.num_seqs, self.layer)


def make_case(
    seqs: list[tuple[int, int]],
    *,
    heads: int,
    kv_heads: int,
    fmt: RowFormat,
    page_size: int,
    layers: int = 2,
    layer: int = 1,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
    extra_pages: int = 3,
    dtype=np.float32,
    seed: int = 0,
) -> Case:
    """``seqs`` = [(kv_len, q_len)]; ``pad_tokens``/``pad_seqs`` add padding past the real batch."""
    rng = np.random.default_rng(seed)
    need = [-(-kv // page_size) for kv, _ in seqs]
    m = max(need) + 1
    n = sum(need) + extra_pages
    w = fmt.width
    pool = np.full((layers, n, page_size, kv_heads, w), np.nan, np.float32)
    order = rng.permutation(n)
    s_total = len(seqs) + pad_seqs
    page_table = np.zeros((s_total, m), np.int32)
    spare = order[sum(need) :]
    taken = 0
    for i, ((kv, _), k) in enumerate(zip(seqs, need)):
        pages = order[taken : taken + k]
        taken += k
        page_table[i, :k] = pages
        # unused entries: a NaN page, or an id past the pool
        page_table[i, k:] = rng.choice(np.concatenate([spare, [n + 5]]), m - k) if len(spare) else n + 5
        rows = rng.standard_normal((kv, kv_heads, w)).astype(np.float32)
        for j in range(kv):
            pool[:, pages[j // page_size], j % page_size] = rows[j]
    kv_lens = np.zeros(s_total, np.int32)
    q_lens = np.zeros(s_total, np.int32)
    for i, (kv, ql) in enumerate(seqs):
        kv_lens[i], q_lens[i] = kv, ql
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1]) + pad_tokens
    q = rng.standard_normal((t, heads, fmt.k_dim)).astype(np.float32)
    return Case(q.astype(dtype), pool.astype(dtype), kv_lens, page_table, cu, len(seqs), layer, fmt, fmt.k_dim**-0.5)


def dense_expected(case: Case) -> np.ndarray:
    """Per sequence: its rows copied out contiguously, then ``kernels.reference.attention``."""
    fmt = case.fmt
    t, h, _ = case.q.shape
    out = np.zeros((t, h, fmt.v_dim), np.float32)
    p = case.pool.shape[2]
    for s in range(case.num_seqs):
        kv, lo, hi = int(case.kv_lens[s]), int(case.cu_q_lens[s]), int(case.cu_q_lens[s + 1])
        if hi == lo:
            continue
        rows = np.stack([case.pool[case.layer, case.page_table[s, j // p], j % p] for j in range(kv)])
        rows = rows.astype(np.float32)
        k = rows[..., : fmt.k_dim][None]
        v = rows[..., fmt.v_offset : fmt.v_offset + fmt.v_dim][None]
        o, _ = dense.attention(case.q[None, lo:hi].astype(np.float32), k, v, scale=case.scale, causal=True)
        out[lo:hi] = np.asarray(o[0])
    return out


MLA_SMALL = RowFormat.mla(32, 16)  # kv_lora 32 + rope 16
GQA_SMALL = RowFormat.gqa(32)

# (name, seqs [(kv_len, q_len)]): decode-only, prefill-only, mixed, with long context
BATCHES = {
    "decode": [(5, 1), (17, 1), (1, 1), (33, 1)],
    "prefill": [(12, 12), (3, 3), (20, 20)],
    "mixed": [(9, 1), (24, 8), (7, 7), (40, 1), (31, 13)],
}
