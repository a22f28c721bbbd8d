"""What the training benchmarks share: a synthetic batch and a timed moela training step.

The benchmark scripts import it by name (``from harness import ...``): a script's own folder is
the first entry of ``sys.path``, so no path patching is needed.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moela.model.transformer import init_model
from moela.training.optim import optimizer
from moela.training.step import make_train_step


def timed(fn, *args, repeats: int = 5) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls after one untimed (compiling) call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens, one document per row: the batch every training-step benchmark times."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def moela_stepper(cfg, batch_np):
    """(run one training step, seconds the first step took, compile included)."""
    graphdef, params, rest = nnx.split(init_model(cfg.model, seed=0), nnx.Param, ...)
    tx = optimizer(cfg.train)
    state = {"params": params, "rest": rest, "opt": tx.init(params)}
    step = make_train_step(graphdef, cfg, tx)
    batch = jax.tree.map(jnp.asarray, batch_np)

    def run():
        state["params"], state["rest"], state["opt"], m = step(state["params"], state["rest"], state["opt"], batch)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0
