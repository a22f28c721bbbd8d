"""The jitted training and evaluation steps, functional over (params, rest, opt_state).

``params`` is the model's ``nnx.Param`` state, ``rest`` everything else (the router biases).
The loss is token-weighted cross-entropy over the loss mask (+ optional z-loss, + the MoE
sequence aux loss, + ``train.mtp_loss_weight`` × the mean of the multi-token-prediction depths'
cross-entropies, each normalised by the positions it scores); with ``train.microbatches`` = M
the batch is split M ways and gradients are accumulated in a ``lax.scan``, each microbatch
normalised by the whole batch's token counts, so the accumulated gradient equals the one-batch
gradient.

Training never forms the batch's logits: the model returns its final hidden states and
``training.losses.head_loss`` computes the output layer's loss and gradient in chunks of
about ``train.loss_chunk_tokens`` rows (``loss_terms``, the plain logits path, is what
evaluation uses and what the tests compare against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moela.configs.schema import Config
from moela.model.runtime import ONE_DEVICE, Partitioner, Runtime
from moela.model.transformer import update_router_bias
from moela.training.losses import head_loss, loss_chunks, mtp_targets


def loss_terms(graphdef, params, rest, batch, rt: Runtime = Runtime()):
    """(summed CE over the mask, summed logsumexp² over the mask, aux dict) of one (micro)batch."""
    model = nnx.merge(graphdef, params, rest)
    logits_btn, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], rt=rt)
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btn, batch["targets"])
    mask_bt = batch["loss_mask"]
    z_bt = jax.nn.logsumexp(logits_btn, axis=-1) ** 2
    return jnp.sum(ce_bt * mask_bt), jnp.sum(z_bt * mask_bt), aux


def training_objective(graphdef, params, rest, batch, *, z_coef: float, chunk_tokens: int, rt: Runtime = Runtime()):
    """(Σ mask·(CE + z_coef·lse²), summed CE, summed lse², aux) of one (micro)batch via ``head_loss``.

    With ``model.mtp_depth`` = D, ``aux["mtp_ce"]`` [D] holds each depth's summed cross-entropy over
    its mask (``losses.mtp_targets``; differentiable), and the MTP blocks' MoE statistics are
    added to ``aux`` (``mtp_expert_load`` [D, E]; their balance loss and dropped pairs summed in)."""
    model = nnx.merge(graphdef, params, rest)
    inputs, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
    x_btd, aux = model.features(inputs, positions, segments, rt=rt)
    w, layout = model.output_weight()
    b, t = inputs.shape
    chunks = loss_chunks(b, t, chunk_tokens)
    objective, stats = head_loss(
        x_btd, w, batch["targets"], batch["loss_mask"], z_coef=z_coef, chunks=chunks, layout=layout
    )
    if model.mtp is not None:
        hidden, mtp_aux = model.mtp_features(x_btd, inputs, positions, segments, rt=rt)
        ces = []
        for k, h_btd in enumerate(hidden, start=1):
            targets_bt, mask_bt = mtp_targets(batch, k)
            ces.append(head_loss(h_btd, w, targets_bt, mask_bt, chunks=chunks, layout=layout)[0])
        aux = {**aux, "mtp_ce": jnp.stack(ces)}
        if mtp_aux:
            aux["mtp_expert_load"] = mtp_aux["expert_load"]
            aux["aux_loss"] = aux["aux_loss"] + mtp_aux["aux_loss"]
            aux["moe_dropped_pairs"] = aux.get("moe_dropped_pairs", 0) + mtp_aux["moe_dropped_pairs"]
    return objective, stats["ce"], stats["z"], aux


def mtp_token_counts(batch, depth: int):
    """[D] the number of positions each MTP depth scores in ``batch`` (its loss's denominator)."""
    counts = [jnp.maximum(jnp.sum(mtp_targets(batch, k)[1]), 1.0) for k in range(1, depth + 1)]
    return jnp.stack(counts) if counts else jnp.zeros((0,), jnp.float32)


def split_microbatches(batch, m: int):
    """[B, ...] -> [m, B/m, ...] with microbatch k = rows k, k + m, k + 2m, ...: rows sharded over
    ``data`` stay on their devices (each device holds an equal share of every microbatch)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1), batch)


def make_train_step(
    graphdef,
    cfg: Config,
    tx: optax.GradientTransformation,
    partitioner: Partitioner = ONE_DEVICE,
    state_shardings=None,
):
    """The jitted step (params, rest, opt_state, batch) -> (params, rest, opt_state, metrics).

    The model runs under ``cfg.runtime`` (kernel backends, remat) and, on a mesh, its
    ``partitioner`` (``moela.parallel.layout.Layout``: activation constraints, ring attention,
    expert dispatch); ``state_shardings`` = (params, rest, opt_state) shardings pin the outputs to
    the layout the inputs came in."""
    rt = Runtime(cfg.runtime, partitioner)
    t, moe = cfg.train, cfg.model.moe
    m, depth = t.microbatches, cfg.model.mtp_depth

    def step(params, rest, opt_state, batch):
        tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        mtp_tokens = mtp_token_counts(batch, depth)  # [D]: whole-batch denominators, as ``tokens``

        def micro_step(mb):
            def objective(p):
                obj, ce, z, aux = training_objective(
                    graphdef, p, rest, mb, z_coef=t.z_loss, chunk_tokens=t.loss_chunk_tokens, rt=rt
                )
                loss = obj / tokens + aux["aux_loss"] / m
                if depth:  # lambda x the mean over depths of each depth's token-mean CE
                    loss = loss + t.mtp_loss_weight * jnp.mean(aux["mtp_ce"] / mtp_tokens)
                return loss, (ce, z, aux)

            (_, (ce, z, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return grads, {
                "ce": ce,
                "z": z,
                "aux_loss": aux["aux_loss"] / m,
                "load": aux.get("expert_load", jnp.zeros((0, 1))),
                "dropped": aux.get("moe_dropped_pairs", jnp.zeros((), jnp.int32)),
                "mtp_ce": jax.lax.stop_gradient(aux.get("mtp_ce", jnp.zeros((0,)))),
                "mtp_load": aux.get("mtp_expert_load", jnp.zeros((0, 1))),
            }

        if m == 1:
            grads, acc = micro_step(batch)
        else:

            def accumulate(carry, mb):
                grads, stats = micro_step(mb)
                return jax.tree.map(jnp.add, carry, (grads, stats)), None

            micro = split_microbatches(batch, m)
            zeros = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, acc), _ = jax.lax.scan(accumulate, zeros, micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if cfg.model.num_moe_layers:
            model = nnx.merge(graphdef, params, rest)
            update_router_bias(model, acc["load"], moe.bias_update_rate, acc["mtp_load"] if depth else None)
            _, _, rest = nnx.split(model, nnx.Param, ...)
        metrics = {
            "loss": acc["ce"] / tokens,
            "z_loss": acc["z"] / tokens,
            "aux_loss": acc["aux_loss"],
            "grad_norm": optax.tree.norm(grads),
            "tokens": tokens,
            "expert_load": acc["load"],
            "moe_dropped_pairs": acc["dropped"],
            "mtp_loss": acc["mtp_ce"] / mtp_tokens,  # [D]: each depth's token-mean CE
        }
        return params, rest, opt_state, metrics

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=out_shardings)


def make_eval_step(graphdef, rt: Runtime = Runtime()):
    def evaluate(params, rest, batch):
        ce, _, _ = loss_terms(graphdef, params, rest, batch, rt)
        return ce, jnp.sum(batch["loss_mask"])

    return jax.jit(evaluate)
