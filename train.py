"""moela's main job: ``python train.py --config configs/<preset>.py [--set key=value ...]``.

At this stage (before the data layer and the optimiser loop land) it validates the config,
reports parameter counts, builds the model and runs one jitted forward + backward pass on a
batch of synthetic tokens, reporting the loss (about ln(vocab) at init), the gradient norm
and the step time. The training loop, tfds data and checkpoints replace the synthetic batch
in the training issue; the command line stays the same.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs.loader import config_from_cli
from model.params import count_params, human
from model.transformer import init_model


def loss_fn(model, tokens_bt):
    logits_btn, aux = model(tokens_bt[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_btn, tokens_bt[:, 1:])
    return jnp.mean(nll) + aux["aux_loss"], aux


def grad_step(model, tokens_bt):
    """Loss, aux and the global gradient norm, all inside one jitted call."""
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens_bt)
    return loss, aux, optax.global_norm(nnx.state(grads, nnx.Param))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python train.py", description=__doc__.split("\n\n")[0])
    _, cfg = config_from_cli(parser, argv)
    counts = count_params(cfg.model)
    print(f"config {cfg.name}: {human(counts['total'])} parameters, {human(counts['active'])} active per token "
          f"({cfg.model.num_layers} layers, {cfg.model.attention.kind} attention, "
          f"{cfg.model.moe.num_experts} routed experts) on {jax.device_count()} {jax.default_backend()} device(s)")
    t0 = time.perf_counter()
    model = init_model(cfg.model, seed=cfg.train.seed)
    init_s = time.perf_counter() - t0
    batch = min(cfg.train.global_batch_size, 8)
    rng = np.random.default_rng(cfg.train.seed)
    tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (batch, cfg.train.seq_len + 1)), jnp.int32)
    step = nnx.jit(grad_step)
    t0 = time.perf_counter()
    jax.block_until_ready(step(model, tokens))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, aux, grad_norm = jax.block_until_ready(step(model, tokens))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    report = {
        "config": cfg.name, "total_params": counts["total"], "active_params": counts["active"],
        "batch": batch, "seq_len": cfg.train.seq_len, "loss": round(float(loss), 4),
        "ln_vocab": round(math.log(cfg.model.vocab_size), 4), "grad_norm": round(float(grad_norm), 4),
        "init_s": round(init_s, 3), "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "tokens_per_s": round(batch * cfg.train.seq_len / step_s),
    }
    if "expert_load" in aux:
        load_le = np.asarray(aux["expert_load"])
        report["expert_load_max_over_mean"] = round(float((load_le.max(-1) / load_le.mean(-1)).max()), 3)
    if not np.isfinite(report["loss"]) or not np.isfinite(report["grad_norm"]):
        print(f"error: non-finite loss {report['loss']} or grad norm {report['grad_norm']}", file=sys.stderr)
        return 1
    print(f"forward+backward on a synthetic [{batch}, {cfg.train.seq_len}] batch: loss {report['loss']:.4f} "
          f"(ln vocab {report['ln_vocab']:.4f}), grad norm {report['grad_norm']:.4f}, "
          f"compile {compile_s:.2f}s, step {step_s * 1e3:.1f} ms (median of 3)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
