"""Ring attention over the ``sequence`` mesh axis, zig-zag load balanced, forward and backward.

When the layout splits the length axis T over n devices, each device holds T/n of the queries
and of the keys/values. Ring attention keeps the queries in place and passes the K/V blocks
round the ring (``ppermute`` to the next device, n - 1 times), so every query block meets
every K/V block once while each device only ever holds one foreign K/V block: memory is
O(T/n), never the whole K/V. Block results are merged with the online-softmax
(log-sum-exp) rule.

Zig-zag layout. Under the causal mask a plain contiguous split is unbalanced: the last device
sees all keys, the first only its own. Instead T is cut into 2n chunks and device i holds
chunks i and 2n-1-i (``zigzag_permutation``; the model permutes its tokens once, up front).
Its local block [chunk i | chunk 2n-1-i] is in increasing position order, so:

* step 0 (its own K/V): plain causal attention over the local block is exactly right;
* step r > 0, K/V from src = (i - r) mod n:
  - src < i: both query chunks see all of chunk src and none of chunk 2n-1-src, so the whole
    local q attends the FIRST kv chunk, unmasked (by position);
  - src > i: chunk i sees nothing, chunk 2n-1-i sees both kv chunks, so only the SECOND q
    chunk attends the whole kv, unmasked.

Both cases are (T/n) x (T/2n) blocks: every device does the same work at every step
(``lax.cond`` on ``axis_index`` picks the case). Segment ids still mask within each block.

Backward (``jax.custom_vjp``): the residuals are only the local q, k, v, segment ids and the
final out and lse. K/V go round the ring again with their dK/dV accumulators travelling with
them; each block's gradients come from ``kernels.attention_bwd`` given the *global* out and
lse (P = exp(s - lse) is then the block's share of the global softmax, so block gradients
simply add). After n - 1 steps one more shift brings every dK/dV home.

``sharded_attention`` is the island the model calls: plain ``kernels.attention`` when the
length axis is not split (under GSPMD for ``xla``; inside ``jax.shard_map`` over batch and
heads for the Pallas kernels, which GSPMD cannot partition), otherwise ``ring_attention``
inside ``jax.shard_map``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moela import kernels


def zigzag_permutation(t: int, n: int) -> np.ndarray:
    """Natural positions in zig-zag order: ``x[:, perm]`` split into n equal contiguous shards
    gives shard i the chunks i and 2n-1-i of 2n equal chunks (in increasing position order)."""
    if n < 1 or t % (2 * n):
        raise ValueError(f"zig-zag layout over {n} devices needs a length divisible by 2*{n} = {2 * n}, got {t}")
    chunks_cl = np.arange(t).reshape(2 * n, t // (2 * n))
    return np.concatenate([np.concatenate([chunks_cl[i], chunks_cl[2 * n - 1 - i]]) for i in range(n)])


def inverse_permutation(perm) -> np.ndarray:
    """``inv`` with ``x[perm][inv] == x``: un-permutes a zig-zag ordered sequence."""
    perm = np.asarray(perm)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def shift(tree, axis_name, n: int):
    """Every device sends ``tree`` to the next one on the ring; device i then holds device i-1's."""
    pairs = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, pairs), tree)


def _cut(seg_bt, sl):
    return None if seg_bt is None else seg_bt[:, sl]


def _merge(out_a, lse_a, out_b, lse_b):
    """Online-softmax merge of attentions over disjoint key sets: out [B,T,H,V], lse [B,H,T].
    Rows that see nothing in either stay at out 0, lse -inf, with no NaNs."""
    lse = jnp.logaddexp(lse_a, lse_b)
    base = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight = lambda part: jnp.swapaxes(jnp.exp(part - base), 1, 2)[..., None]  # [B,H,T] -> [B,T,H,1]; 0 at -inf
    return out_a * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b), lse


def _forward(q, k, v, q_seg, kv_seg, scale, axis_name, backend):
    """(out [B,T,H,V] in q's dtype, lse [B,H,T]) of the local queries against the whole ring."""
    attend = partial(kernels.attention, scale=scale, backend=backend)
    out, lse = attend(q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    n, c = jax.lax.axis_size(axis_name), q.shape[1] // 2
    if n == 1:
        return out, lse
    i = jax.lax.axis_index(axis_name)

    def earlier(out, lse, k, v, kv_seg):  # src < i: all local queries x first kv chunk
        o, o_lse = attend(
            q, k[:, :c], v[:, :c], causal=False, q_segment_ids=q_seg, kv_segment_ids=_cut(kv_seg, slice(c))
        )
        return _merge(out, lse, o, o_lse)

    def later(out, lse, k, v, kv_seg):  # src > i: second query chunk x all kv
        o, o_lse = attend(
            q[:, c:], k, v, causal=False, q_segment_ids=_cut(q_seg, slice(c, None)), kv_segment_ids=kv_seg
        )
        o, o_lse = _merge(out[:, c:], lse[..., c:], o, o_lse)
        return jnp.concatenate([out[:, :c], o], axis=1), jnp.concatenate([lse[..., :c], o_lse], axis=-1)

    out, kv = out.astype(jnp.float32), (k, v, kv_seg)
    for r in range(1, n):
        kv = shift(kv, axis_name, n)
        out, lse = jax.lax.cond(i >= r, earlier, later, out, lse, *kv)  # src = (i - r) mod n < i  <=>  i >= r
    return out.astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, q_seg, kv_seg, scale, axis_name, backend):
    return _forward(q, k, v, q_seg, kv_seg, scale, axis_name, backend)


def _ring_fwd(q, k, v, q_seg, kv_seg, scale, axis_name, backend):
    out, lse = _forward(q, k, v, q_seg, kv_seg, scale, axis_name, backend)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(scale, axis_name, backend, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    grad = partial(kernels.attention_bwd, scale=scale, backend=backend)
    f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
    dq, dk, dv = f32(
        *grad(q, k, v, out, lse, d_out, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg, d_lse_bht=d_lse)
    )
    n, c = jax.lax.axis_size(axis_name), q.shape[1] // 2
    if n > 1:
        i = jax.lax.axis_index(axis_name)
        tail = slice(c, None)

        def earlier(dq, dk, dv, k, v, kv_seg):  # src < i: all local queries x first kv chunk
            gq, gk, gv = f32(
                *grad(
                    q,
                    k[:, :c],
                    v[:, :c],
                    out,
                    lse,
                    d_out,
                    causal=False,
                    q_segment_ids=q_seg,
                    kv_segment_ids=_cut(kv_seg, slice(c)),
                    d_lse_bht=d_lse,
                )
            )
            return dq + gq, dk.at[:, :c].add(gk), dv.at[:, :c].add(gv)

        def later(dq, dk, dv, k, v, kv_seg):  # src > i: second query chunk x all kv
            gq, gk, gv = f32(
                *grad(
                    q[:, tail],
                    k,
                    v,
                    out[:, tail],
                    lse[..., tail],
                    d_out[:, tail],
                    causal=False,
                    q_segment_ids=_cut(q_seg, tail),
                    kv_segment_ids=kv_seg,
                    d_lse_bht=d_lse[..., tail],
                )
            )
            return dq.at[:, tail].add(gq), dk + gk, dv + gv

        kv = (k, v, kv_seg)
        for r in range(1, n):
            kv, (dk, dv) = shift((kv, (dk, dv)), axis_name, n)  # dK/dV travel with the K/V they belong to
            dq, dk, dv = jax.lax.cond(i >= r, earlier, later, dq, dk, dv, *kv)
        dk, dv = shift((dk, dv), axis_name, n)  # held K/V came from device i+1: one more step takes them home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_bthk, k_bsgk, v_bsgv, q_seg_bt=None, kv_seg_bt=None, *, scale: float, axis_name: str, backend: str = "auto"
):
    """Causal (+ segment) attention of zig-zag sharded sequences; call inside ``shard_map``.

    Local shapes: q [B, T, H, K], k [B, T, G, K], v [B, T, G, V], segment ids [B, T] (both or
    None), where T = (global length) / n and the local block is [chunk i | chunk 2n-1-i] of
    the zig-zag layout over mesh axis ``axis_name`` of size n. Returns (out [B, T, H, V] in
    q's dtype, lse [B, H, T] float32, -inf for rows that see nothing); differentiable in q,
    k, v (and through lse) with the ring backward described in the module docstring.
    """
    if (q_seg_bt is None) != (kv_seg_bt is None):
        raise ValueError("pass both q_seg_bt and kv_seg_bt, or neither")
    if q_bthk.shape[1] != k_bsgk.shape[1] or q_bthk.shape[1] % 2:
        raise ValueError(
            f"ring attention needs equal, even local q and kv lengths (two zig-zag chunks), got "
            f"{q_bthk.shape[1]} and {k_bsgk.shape[1]}"
        )
    return _ring(q_bthk, k_bsgk, v_bsgv, q_seg_bt, kv_seg_bt, float(scale), axis_name, backend)


@dataclasses.dataclass(frozen=True)
class AttentionAxes:
    """The mesh axes (None: not split) of attention's batch, length, query heads and kv heads;
    ``kv_heads_name`` is the logical name of the kv heads (for error messages)."""

    batch: str | None = None
    length: str | None = None
    heads: str | None = None
    kv_heads: str | None = None
    kv_heads_name: str = "act_kv_heads"


def sharded_attention(
    q_bthk, k_bsgk, v_bsgv, segment_ids_bt, *, mesh: Mesh, axes: AttentionAxes, scale: float, backend: str = "auto"
):
    """Causal self-attention of arrays split over ``mesh`` as ``axes`` say -> out [B, T, H, V].

    When ``length`` is not split this is ``kernels.attention``: under GSPMD for ``xla`` and
    ``reference``, per (rows, heads) shard inside ``jax.shard_map`` for the Pallas kernels (a
    custom call GSPMD cannot partition). Otherwise the inputs must already be in zig-zag order
    along T (``zigzag_permutation`` over the ``length`` axis size) and ``ring_attention`` runs
    per device.
    """
    seq = axes.length
    xla = kernels.ATTENTION.resolve(backend) in ("xla", "reference")
    if seq is None and xla:
        return kernels.attention(
            q_bthk,
            k_bsgk,
            v_bsgv,
            scale=scale,
            causal=True,
            q_segment_ids=segment_ids_bt,
            kv_segment_ids=segment_ids_bt,
            backend=backend,
        )[0]
    b, t = q_bthk.shape[:2]
    batch, heads, kv_heads = axes.batch, axes.heads, axes.kv_heads
    if heads != kv_heads and not (kv_heads is None and k_bsgk.shape[2] == 1):
        raise ValueError(
            f"query heads are split over {heads!r} but kv heads ({axes.kv_heads_name}) over "
            f"{kv_heads!r}: each device's query heads would not match its kv heads"
        )
    q_spec, kv_spec, seg_spec = P(batch, seq, heads, None), P(batch, seq, kv_heads, None), P(batch, seq)
    if seq is None:  # a Pallas kernel: one call per device on its rows and heads (GSPMD cannot split it)

        def local_kernel(q, k, v, *seg):
            seg = seg[0] if seg else None
            return kernels.attention(
                q, k, v, scale=scale, causal=True, q_segment_ids=seg, kv_segment_ids=seg, backend=backend
            )[0]

        segs = () if segment_ids_bt is None else (segment_ids_bt,)
        in_specs = (q_spec, kv_spec, kv_spec) + (seg_spec,) * len(segs)
        return jax.shard_map(local_kernel, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
            q_bthk, k_bsgk, v_bsgv, *segs
        )
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones((b, t), jnp.int32)
    n = mesh.shape[seq]
    if t % (2 * n):
        raise ValueError(
            f"ring attention over '{seq}' ({n} devices) needs a length divisible by 2*{n} = {2 * n} "
            f"(zig-zag chunks), got {t}"
        )

    def local(q, k, v, seg):
        return ring_attention(q, k, v, seg, seg, scale=scale, axis_name=seq, backend=backend)[0]

    # pallas_call outputs carry no varying-manual-axes type, so the vma check is off for the kernels
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=xla
    )(q_bthk, k_bsgk, v_bsgv, segment_ids_bt)
