"""Speculative decoding with the model's multi-token-prediction module as the draft.

DeepSeek-V3 serves its MTP module as a draft model (report sec. 5.4.3: 85-90% of second tokens
accepted). With ``serve.speculative_tokens`` = K, one device step does, for every sequence:

1. **Verify.** The model runs over the sequence's chunk: its last accepted token y (or a prompt
   chunk) followed by the n <= K drafts d_1..d_n proposed in the previous step, writing their
   cache rows. Row j (y's position + j) scores the token draft d_{j+1} proposed.
2. **Accept.** Greedy: d_{j+1} is accepted while it equals the row's argmax. Sampling, the
   standard rule (Leviathan et al. 2023, Chen et al. 2023): accept d_{j+1} with probability
   min(1, p_j(d)/q_j(d)) (p the target's filtered distribution, q the draft's); at the first
   rejection draw from normalise(max(p_j - q_j, 0)); if all n are accepted draw a bonus token from
   p_n. Either way the emitted tokens are distributed exactly as non-speculative sampling. The
   accepted drafts and the drawn token are appended; rejected positions are rolled back by not
   counting them (their cache rows are overwritten when those positions are computed again).
3. **Draft.** The MTP module runs over the chunk (position i: the model's hidden state h_i and
   the token after i: the chunk's next token, or at the last accepted position the token just
   drawn), writing its own cache layer; at the last accepted position it proposes d'_1. Further
   drafts chain the same module one position at a time on its own output state and the draft
   before (as vLLM and SGLang run DeepSeek-V3's single module), their rows overwritten next step.

Randomness is per (seed, generated index, stream) (``sampling.row_key``), so a request samples the
same tokens whatever shares its batch. Greedy output is the non-speculative output token for token.
Per-row drafts live on the host; the draft distributions q (needed at the next verification) stay
on the device in a [rows, K, V] buffer, one row per running sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moela.inference.sampling import SamplingArrays, filtered_probs, row_key
from moela.model.cache import PagedCache
from moela.model.runtime import Runtime


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Drafts:
    """One step's speculative inputs, per sequence row [S] (host-built)::

    tokens     [S, K]  the drafts at the end of the chunk (d_1 .. d_n, then 0)
    count      [S]     n
    base_last  [S]     packed index of the chunk's last token before its drafts
    follow     [S]     for a chunk that stops short of its sequence's end: the token after it
    samples    [S]     the chunk reaches its sequence's end (it verifies, draws and drafts)
    limit      [S]     the sequence's final length: no draft is proposed at or past it
    rows       [S]     the sequence's row of the draft-distribution buffer
    """

    tokens: jax.Array
    count: jax.Array
    base_last: jax.Array
    follow: jax.Array
    samples: jax.Array
    limit: jax.Array
    rows: jax.Array


def _leading(ok_sj):
    """[S] how many leading entries of each row are true."""
    return jnp.sum(jnp.cumprod(ok_sj.astype(jnp.int32), axis=1), axis=1)


def _probs(logits_sv, sampling: SamplingArrays):
    return jax.vmap(filtered_probs)(logits_sv, sampling.temperature, sampling.top_k, sampling.top_p)


def verify(logits_sjv, drafts_sk, count_s, q_skv, sampling: SamplingArrays):
    """(accepted drafts [S], the token drawn after them [S]) from the target's logits at the K + 1
    verify rows [S, K+1, V], the drafts [S, K] (the first ``count`` real) and their distributions
    q [S, K, V]. ``sampling.index`` is the generated index row 0 draws."""
    k = drafts_sk.shape[1]
    j_k = jnp.arange(k)
    greedy_sj = jnp.argmax(logits_sjv, axis=-1).astype(jnp.int32)
    a_greedy = _leading((drafts_sk == greedy_sj[:, :k]) & (j_k < count_s[:, None]))
    next_greedy = jnp.take_along_axis(greedy_sj, a_greedy[:, None], axis=1)[:, 0]

    def sampled(_):
        p_sjv = jax.vmap(_probs, in_axes=(1, None), out_axes=1)(logits_sjv, sampling)
        p_d = jnp.take_along_axis(p_sjv[:, :k], drafts_sk[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q_skv, drafts_sk[..., None], axis=-1)[..., 0]
        seed = sampling.seed.astype(jnp.uint32)

        def uniform(seed, index):
            return jax.random.uniform(row_key(seed, index, 1))

        u_sk = jax.vmap(jax.vmap(uniform, in_axes=(None, 0)))(seed, sampling.index[:, None] + j_k)
        a_s = _leading((u_sk * q_d < p_d) & (j_k < count_s[:, None]))
        p_av = jnp.take_along_axis(p_sjv, a_s[:, None, None], axis=1)[:, 0]
        q_av = jnp.take_along_axis(q_skv, jnp.minimum(a_s, k - 1)[:, None, None], axis=1)[:, 0]
        rejected = (a_s < count_s)[:, None]
        resid_v = jnp.where(rejected, jnp.maximum(p_av - q_av, 0.0), p_av)
        resid_v = jnp.where(jnp.sum(resid_v, axis=-1, keepdims=True) > 0, resid_v, p_av)

        def draw(seed, index, probs_v):
            return jax.random.categorical(row_key(seed, index, 2), jnp.log(probs_v)).astype(jnp.int32)

        next_s = jax.vmap(draw)(seed, sampling.index + a_s, resid_v)
        hot = sampling.temperature > 0
        return jnp.where(hot, a_s, a_greedy), jnp.where(hot, next_s, next_greedy)

    return jax.lax.cond(jnp.any(sampling.temperature > 0), sampled, lambda _: (a_greedy, next_greedy), None)


def propose(logits_sv, sampling: SamplingArrays, index_s):
    """(draft token [S], its distribution q [S, V]) for generated ``index_s``: the argmax for greedy
    rows, a draw from the filtered draft distribution otherwise."""
    greedy_s = jnp.argmax(logits_sv, axis=-1).astype(jnp.int32)

    def sampled(_):
        q_sv = _probs(logits_sv, sampling)

        def draw(seed, index, q_v):
            return jax.random.categorical(row_key(seed, index, 3), jnp.log(q_v)).astype(jnp.int32)

        drawn_s = jax.vmap(draw)(sampling.seed.astype(jnp.uint32), index_s, q_sv)
        return jnp.where(sampling.temperature > 0, drawn_s, greedy_s), q_sv

    zeros = jnp.zeros(logits_sv.shape, jnp.float32)
    return jax.lax.cond(jnp.any(sampling.temperature > 0), sampled, lambda _: (greedy_s, zeros), None)


def speculative_step(state, pool, q_buf, batch, sampling: SamplingArrays, drafts: Drafts, *, graphdef, rt: Runtime):
    """One verify-accept-draft step (module docstring) over a packed batch (``engine.Batch``).
    Returns (accepted drafts [S], drawn token [S], new drafts [S, K], pool, q buffer)."""
    model = nnx.merge(graphdef, state)
    t, (s, k) = batch.tokens.shape[0], drafts.tokens.shape
    real_s = jnp.arange(s) < batch.num_seqs
    x_td, cache = model.serve_hidden(batch.tokens, batch.positions, batch.cache(pool), rt=rt)
    rows_sj = jnp.minimum(drafts.base_last[:, None] + jnp.arange(k + 1), t - 1)
    accepted_s, next_s = verify(model.logits(x_td[rows_sj]), drafts.tokens, drafts.count, q_buf[drafts.rows], sampling)
    accepted_s = jnp.where(drafts.samples, accepted_s, 0)

    # The draft module over the chunk: each position with the token after it.
    boundary_s = jnp.minimum(drafts.base_last + accepted_s, t - 1)
    after_s = jnp.where(drafts.samples, next_s, drafts.follow)
    next_t = jnp.concatenate([batch.tokens[1:], jnp.zeros((1,), batch.tokens.dtype)])
    next_t = next_t.at[jnp.where(real_s, boundary_s, t)].set(after_s, mode="drop")
    g_td, cache = model.mtp_serve_step(x_td, next_t, batch.positions, cache, rt=rt)

    # Drafts from the last accepted position b: d'_j scores position b + 1 + j; chained steps
    # write the module's rows at b + 1 .. b + K - 1.
    g_sd, pos_s, token_s = g_td[boundary_s], batch.positions[boundary_s], next_s
    index_s = sampling.index + accepted_s + 1
    page = pool.shape[2]
    proposed, dists = [], []
    for j in range(1, k + 1):
        token_s, q_sv = propose(model.mtp_logits(g_sd), sampling, index_s + j - 1)
        proposed.append(token_s)
        dists.append(q_sv)
        if j == k:
            break
        p_s = pos_s + j
        live_s = real_s & drafts.samples & (p_s + 2 < drafts.limit)
        p_s = jnp.where(live_s, p_s, 0)
        page_s = jnp.take_along_axis(batch.page_table, (p_s // page)[:, None], axis=1, mode="clip")[:, 0]
        view = PagedCache(
            cache.pool,
            jnp.where(live_s, page_s * page + p_s % page, -1),
            p_s + 1,
            batch.page_table,
            jnp.arange(s + 1, dtype=jnp.int32),
            batch.num_seqs,
        )
        g_sd, cache = model.mtp_serve_step(g_sd, token_s, p_s, view, rt=rt)
    rows = jnp.where(real_s & drafts.samples, drafts.rows, q_buf.shape[0])
    q_buf = q_buf.at[rows].set(jnp.stack(dists, axis=1), mode="drop")
    return accepted_s, next_s, jnp.stack(proposed, axis=1), cache.pool, q_buf
