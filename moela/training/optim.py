"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping and a weight-decay
mask (off for norm scales, and for the embedding table unless ``train.decay_embeddings``)."""

from __future__ import annotations

import jax
import optax

from moela.configs.schema import TrainConfig


def learning_rate(t: TrainConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
    decay_steps = max(t.steps - t.warmup_steps, 1)
    floor = t.learning_rate * t.min_lr_ratio
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "linear":
        decay = optax.linear_schedule(t.learning_rate, floor, decay_steps)
    else:
        decay = optax.constant_schedule(t.learning_rate)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def decay_mask(params):
    """True where weight decay applies: every matrix but norm scales (and embeddings, by default)."""

    def decays(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n not in (None, "value")]
        if names[-1] == "scale":
            return False
        return not (names[0] == "embed")

    return jax.tree_util.tree_map_with_path(decays, params)


def decay_mask_for(t: TrainConfig):
    if not t.decay_embeddings:
        return decay_mask

    def with_embeddings(params):
        mask = decay_mask(params)
        return jax.tree_util.tree_map_with_path(
            lambda path, m: m or [getattr(k, "key", None) for k in path][0] == "embed", mask
        )

    return with_embeddings


def optimizer(t: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(
        optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask_for(t))
    )
    return optax.chain(*parts)
