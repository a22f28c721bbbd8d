"""Per-request sampling inside the jitted step: greedy, temperature, top-k, top-p, seeded.

Each row's randomness comes only from its own seed and the index of the token it is drawing
(``fold_in(key(seed), index)``), never from a batch-wide key, so a request samples the same
tokens whatever else shares its batch, and a preempted request that is recomputed draws again
exactly what it drew before. Sampling is Gumbel-max over the kept logits: argmax(l/τ + g)
with g ~ Gumbel(0, 1) is a draw from softmax(l/τ) restricted to the kept tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per sequence row [S]: temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
    seed, and index (how many tokens the request has generated so far)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    index: jax.Array

    @classmethod
    def greedy(cls, rows: int) -> "SamplingArrays":
        return cls(
            np.zeros(rows, np.float32),
            np.zeros(rows, np.int32),
            np.ones(rows, np.float32),
            np.zeros(rows, np.uint32),
            np.zeros(rows, np.int32),
        )


def _kept(logits_v, temperature, top_k, top_p):
    """(scaled logits sorted descending [V], their vocabulary ids [V], which of them the top-k ∩
    top-p filter keeps [V]): the one filter every draw and distribution here uses."""
    v = logits_v.shape[0]
    scaled_v = logits_v / jnp.maximum(temperature, 1e-6)
    sorted_v, order_v = jax.lax.top_k(scaled_v, v)  # descending
    rank_v = jnp.arange(v)
    keep_v = rank_v < jnp.where(top_k > 0, top_k, v)
    probs_v = jax.nn.softmax(jnp.where(keep_v, sorted_v, -jnp.inf))
    before_v = jnp.cumsum(probs_v) - probs_v  # mass of the strictly better tokens
    return sorted_v, order_v, keep_v & ((before_v < top_p) | (rank_v == 0))


def _filtered_draw(logits_v, temperature, top_k, top_p, seed, index):
    """One row: a token drawn from softmax(logits / temperature) over the top-k ∩ top-p set."""
    v = logits_v.shape[0]
    sorted_v, order_v, keep_v = _kept(logits_v, temperature, top_k, top_p)
    key = jax.random.fold_in(jax.random.key(seed), index)
    gumbel_v = jax.random.gumbel(key, (v,), jnp.float32)
    choice = jnp.argmax(jnp.where(keep_v, sorted_v + gumbel_v, -jnp.inf))
    return order_v[choice].astype(jnp.int32)


def sample(logits_sv, params: SamplingArrays):
    """Next token per row [S] int32. Rows with temperature 0 take the argmax; the sort the
    filters need runs only when some row samples."""
    greedy_s = jnp.argmax(logits_sv, axis=-1).astype(jnp.int32)

    def draw(_):
        drawn_s = jax.vmap(_filtered_draw)(
            logits_sv, params.temperature, params.top_k, params.top_p, params.seed.astype(jnp.uint32), params.index
        )
        return jnp.where(params.temperature > 0, drawn_s, greedy_s)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy_s, None)


def filtered_probs(logits_v, temperature, top_k, top_p):
    """[V] the distribution ``_filtered_draw`` draws from, in vocabulary order: softmax(logits /
    temperature) over the top-k ∩ top-p set, zero elsewhere (speculative decoding compares the
    target's and the draft's)."""
    sorted_v, order_v, keep_v = _kept(logits_v, temperature, top_k, top_p)
    kept_v = jax.nn.softmax(jnp.where(keep_v, sorted_v, -jnp.inf))
    return jnp.zeros(logits_v.shape[0], jnp.float32).at[order_v].set(kept_v)


def row_key(seed, index, stream: int):
    """The key of one row's ``stream`` of draws for the token at generated ``index`` (speculative
    decoding: 1 acceptance tests, 2 residual and bonus draws, 3 draft draws)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), stream)
