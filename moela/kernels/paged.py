"""Ragged paged attention: the serving op, over a packed batch of decode tokens, prefill chunks
and whole prompts, reading keys and values from a paged cache.

Layout (one pool for all layers; ``L`` layers, ``N`` pages of ``P`` rows, ``G`` kv heads)::

    q            [T, H, K]        T packed query tokens (sequence after sequence)
    pool         [L, N, P, G, W]  cache rows; a row's keys are row[:K], its values
                                  row[v_offset : v_offset + v_dim]
    kv_lens      [S] int32        each sequence's cache length, the new tokens included
    page_table   [S, M] int32     each sequence's pages, in order (unused entries: anything)
    cu_q_lens    [S + 1] int32    cumulative query counts: sequence s owns tokens
                                  cu_q_lens[s] : cu_q_lens[s + 1]
    num_seqs     int32 scalar     sequences in use (the rest of S is padding)
    layer        int32 scalar     which layer of the pool to read

A sequence's queries are its *last* q_len positions (causal with offset kv_len - q_len), so
one op serves decode (q_len 1), chunked prefill (a chunk after cached context) and whole
prompts. Tokens past ``cu_q_lens[num_seqs]`` are padding and return zeros.

Two row forms share the layout:

* MLA, absorbed (latent MQA): G = 1, W = kv_lora_rank + rope dim, rows [c_kv | k_pe];
  queries are [q_nope·W_UK | q_pe] so K = W, and the values are the latent c_kv
  (v_offset 0, v_dim = kv_lora_rank).
* GQA: rows [k | v] per kv head, W = 2·D, K = D, v_offset = D, v_dim = D.

``write_rows`` is the companion op that puts the new tokens' rows into their pages before the
attention reads them (``slots`` = page · P + offset; -1 drops a padding token). It is an XLA
scatter on every backend: on a donated pool it updates in place.

Backends (``PAGED``, chosen by ``runtime.paged_attention``): ``reference``
(``kernels.paged_reference``: gathers each token's whole page table; the definition everything
else is tested against), ``xla`` (``kernels.paged_xla``: blocks of pages
with an online softmax, only as far as the longest context; the CPU path), ``pallas`` (the
kernel of the default platform), ``interpret`` (the TPU kernel under the TPU interpreter),
``interpret_gpu`` (the GPU kernel under the Pallas interpreter), ``auto`` (pallas on TPU/GPU,
xla elsewhere).
"""

from __future__ import annotations

import jax.numpy as jnp

from moela.kernels import paged_xla
from moela.kernels.flash import platform_target
from moela.kernels.paged_reference import RowFormat, reference, token_layout, validate, write_rows
from moela.kernels.registry import ANY, Backends


def _kernel(target: str, interpret: bool):
    """The Pallas kernel of ``target``, imported when first used (its Pallas backend loads then)."""

    def run(*args, scale, fmt, blocks):
        if target == "tpu":
            from moela.kernels import ragged_tpu as kernel
        else:
            from moela.kernels import ragged_gpu as kernel
        return kernel.ragged_paged_attention(*args, scale=scale, fmt=fmt, interpret=interpret, blocks=blocks)

    return run


def _pallas(*args, scale, fmt, blocks):
    return _kernel(platform_target(), False)(*args, scale=scale, fmt=fmt, blocks=blocks)


def _unblocked(fn):
    return lambda *args, scale, fmt, blocks: fn(*args, scale=scale, fmt=fmt)


PAGED = Backends(
    "paged attention",
    {
        "reference": _unblocked(reference),
        "xla": _unblocked(paged_xla.ragged_paged_attention),
        "pallas": _pallas,
        "interpret": _kernel("tpu", True),
        "interpret_gpu": _kernel("gpu", True),
    },
    auto={"tpu": "pallas", "gpu": "pallas", ANY: "xla"},
)


def ragged_paged_attention(
    q_thk,
    pool_lnpgw,
    kv_lens_s,
    page_table_sm,
    cu_q_lens_s1,
    num_seqs,
    layer=0,
    *,
    scale: float,
    fmt: RowFormat,
    backend: str = "auto",
    blocks=None,
):
    """Attention of packed ragged queries over a paged cache -> out [T, H, v_dim] in q's dtype.

    ``blocks`` tunes the kernels (their module's ``BlockSizes``); the reference and xla paths ignore it."""
    validate(q_thk, pool_lnpgw, kv_lens_s, page_table_sm, cu_q_lens_s1, fmt)
    impl = PAGED[backend]
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    return impl(
        q_thk,
        pool_lnpgw,
        kv_lens_s.astype(jnp.int32),
        page_table_sm.astype(jnp.int32),
        cu_q_lens_s1.astype(jnp.int32),
        num_seqs,
        layer,
        scale=scale,
        fmt=fmt,
        blocks=blocks,
    )


__all__ = ["PAGED", "RowFormat", "ragged_paged_attention", "reference", "token_layout", "write_rows"]
