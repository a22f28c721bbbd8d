"""Output-layer cross-entropy that never holds the whole batch's logits, with its gradient
formed in the forward pass.

    objective, stats = head_loss(x_btd, w, targets_bt, weights_bt, z_coef=..., chunks=..., layout=...)

    objective = Σ_bt weights · (CE + z_coef · lse²)      stats = {"ce": Σ w·CE, "z": Σ w·lse²}

The rows are cut into ``chunks`` pieces along the sequence (strided: chunk k holds positions
k, k + chunks, ..., so a batch sharded over (data, sequence) keeps its sharding inside every
chunk). For each chunk the logits [B·T/chunks, N] are formed in float32, reduced to the
log-sum-exp, and, because the objective is a sum of per-token losses whose cotangent is one
scalar, turned at once into dlogits = w·(softmax − onehot + 2·z_coef·lse·softmax), which is
contracted into dx (this chunk) and dW (accumulated). The backward pass only scales the saved
dx, dW by the incoming cotangent. Compared with autodiff of ``log_softmax(x·W)``: the same
three matmuls, one chunk of logits in memory instead of [B, T, N], and no pass re-reads them.

``stats`` carry no gradient; differentiate ``objective``. ``layout`` says how ``w`` is stored:
"dn" for an LM head [D, N], "nd" for a tied embedding table [N, D]. Matmuls run in x's dtype
with float32 accumulation; dW comes back in w's dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

_LOGITS = {"dn": "md,dn->mn", "nd": "md,nd->mn"}  # rows flattened: 2-D matmuls (see model.layers.project)
_DX = {"dn": "mn,dn->md", "nd": "mn,nd->md"}
_DW = {"dn": "md,mn->dn", "nd": "md,mn->nd"}


def _split(a_bt, chunks: int):
    """[B, T, ...] -> [chunks, B, T/chunks, ...]; chunk k holds positions k, k + chunks, ..."""
    b, t = a_bt.shape[:2]
    return jnp.moveaxis(a_bt.reshape((b, t // chunks, chunks) + a_bt.shape[2:]), 2, 0)


def _merge(a_kbc, t: int):
    """Inverse of ``_split``."""
    a = jnp.moveaxis(a_kbc, 0, 2)
    return a.reshape((a.shape[0], t) + a.shape[3:])


def _loss_and_grads(x_btd, w, targets_bt, weights_bt, z_coef: float, chunks: int, layout: str):
    t = x_btd.shape[1]
    w_c = w.astype(x_btd.dtype)

    def body(dw, inputs):
        x_bcd, t_bc, wt_bc = inputs
        b, c, d = x_bcd.shape
        x_md, t_bc, wt_bc = x_bcd.reshape(b * c, d), t_bc.reshape(-1), wt_bc.reshape(-1)
        logits = jnp.einsum(_LOGITS[layout], x_md, w_c, preferred_element_type=jnp.float32)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        lse = m + jnp.log(s)
        p = e / s
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_bc[:, None]
        target_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
        dlogits = (wt_bc[:, None] * (p - onehot + (2.0 * z_coef) * lse * p)).astype(x_md.dtype)
        dx_md = jnp.einsum(_DX[layout], dlogits, w_c, preferred_element_type=jnp.float32).astype(x_md.dtype)
        dw = dw + jnp.einsum(_DW[layout], x_md, dlogits, preferred_element_type=jnp.float32)
        lse = lse[..., 0]
        return dw, (dx_md.reshape(b, c, d), jnp.sum(wt_bc * (lse - target_logit)), jnp.sum(wt_bc * lse * lse))

    xs = (_split(x_btd, chunks), _split(targets_bt, chunks), _split(weights_bt.astype(jnp.float32), chunks))
    dw, (dx, ce, z) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    ce, z = jnp.sum(ce), jnp.sum(z)
    return (ce + z_coef * z, ce, z), (_merge(dx, t), dw.astype(w.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_loss(x_btd, w, targets_bt, weights_bt, z_coef, chunks, layout):
    return _loss_and_grads(x_btd, w, targets_bt, weights_bt, z_coef, chunks, layout)[0]


def _fwd(x_btd, w, targets_bt, weights_bt, z_coef, chunks, layout):
    return _loss_and_grads(x_btd, w, targets_bt, weights_bt, z_coef, chunks, layout)


def _bwd(z_coef, chunks, layout, residuals, cotangents):
    dx, dw = residuals
    g = cotangents[0]  # the stats' cotangents are zero: head_loss stops their gradient
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, None


_head_loss.defvjp(_fwd, _bwd)


def head_loss(x_btd, w, targets_bt, weights_bt, *, z_coef: float = 0.0, chunks: int = 1, layout: str = "dn"):
    """(objective, {"ce", "z"}) of the output layer; see the module docstring."""
    if layout not in _LOGITS:
        raise ValueError(f"layout must be 'dn' (w [D, N]) or 'nd' (w [N, D]), got {layout!r}")
    t = x_btd.shape[1]
    if chunks < 1 or t % chunks:
        raise ValueError(f"loss chunks ({chunks}) must be a positive divisor of the sequence length ({t})")
    objective, ce, z = _head_loss(x_btd, w, targets_bt, weights_bt, float(z_coef), int(chunks), layout)
    return objective, {"ce": jax.lax.stop_gradient(ce), "z": jax.lax.stop_gradient(z)}


def loss_chunks(batch: int, seq_len: int, target_tokens: int) -> int:
    """The fewest sequence chunks (a divisor of seq_len) with at most ``target_tokens`` rows each
    (seq_len chunks, one position each, when even that is more)."""
    want = -(-batch * seq_len // max(target_tokens, 1))
    return next((d for d in range(max(want, 1), seq_len + 1) if seq_len % d == 0), seq_len)


def mtp_targets(batch: dict, k: int):
    """Targets and loss mask [B, T] of multi-token-prediction depth k (``model.mtp``): position i
    scores the token k + 1 ahead, which is the target of position i + k, counted where both
    positions have a real target in the same document (a packed row's segments are contiguous, so
    an equal segment id means the same piece): masked past the row's end and across documents."""
    targets_bt, mask_bt, seg_bt = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    t = targets_bt.shape[1]

    def ahead(a_bt):
        return jnp.pad(a_bt[:, k:], ((0, 0), (0, min(k, t))))[:, :t]

    same = (ahead(seg_bt) == seg_bt) & (seg_bt > 0)
    return ahead(targets_bt), mask_bt * ahead(mask_bt) * same.astype(mask_bt.dtype)
