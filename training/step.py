"""The jitted training and evaluation steps, functional over (params, rest, opt_state).

``params`` is the model's ``nnx.Param`` state, ``rest`` everything else (the router biases).
The loss is token-weighted cross-entropy over the loss mask (+ optional z-loss, + the MoE
sequence aux loss); with ``train.microbatches`` = M the batch is split M ways and gradients
are accumulated in a ``lax.scan``, each microbatch normalised by the whole batch's token
count, so the accumulated gradient equals the one-batch gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from configs.schema import Config
from model.transformer import update_router_bias


def loss_terms(graphdef, params, rest, batch):
    """(summed CE over the mask, summed logsumexp² over the mask, aux dict) of one (micro)batch."""
    model = nnx.merge(graphdef, params, rest)
    logits_btn, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btn, batch["targets"])
    mask_bt = batch["loss_mask"]
    z_bt = jax.nn.logsumexp(logits_btn, axis=-1) ** 2
    return jnp.sum(ce_bt * mask_bt), jnp.sum(z_bt * mask_bt), aux


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation):
    t, moe = cfg.train, cfg.model.moe
    m = t.microbatches

    def step(params, rest, opt_state, batch):
        tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            def objective(p):
                ce, z, aux = loss_terms(graphdef, p, rest, mb)
                return (ce + t.z_loss * z) / tokens + aux["aux_loss"] / m, (ce, z, aux)

            (_, (ce, z, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            acc_grads, acc = carry
            acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
            acc = {"ce": acc["ce"] + ce, "z": acc["z"] + z, "aux_loss": acc["aux_loss"] + aux["aux_loss"] / m,
                   "load": acc["load"] + aux.get("expert_load", 0.0)}
            return (acc_grads, acc), None

        load0 = jnp.zeros((cfg.model.num_moe_layers, max(moe.num_experts, 1)), jnp.float32)
        zeros = {"ce": jnp.zeros(()), "z": jnp.zeros(()), "aux_loss": jnp.zeros(()), "load": load0}
        (grads, acc), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, params), zeros), micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if cfg.model.num_moe_layers:
            model = nnx.merge(graphdef, params, rest)
            update_router_bias(model, acc["load"], moe.bias_update_rate)
            _, _, rest = nnx.split(model, nnx.Param, ...)
        metrics = {"loss": acc["ce"] / tokens, "z_loss": acc["z"] / tokens, "aux_loss": acc["aux_loss"],
                   "grad_norm": optax.global_norm(grads), "tokens": tokens, "expert_load": acc["load"]}
        return params, rest, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_step(graphdef):
    def evaluate(params, rest, batch):
        ce, _, _ = loss_terms(graphdef, params, rest, batch)
        return ce, jnp.sum(batch["loss_mask"])

    return jax.jit(evaluate)
