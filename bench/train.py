"""Training-step throughput on the ``bench`` preset: moela (float32 and bfloat16 compute)
against transformers' DeepseekV3 of the identical shape (PyTorch, CPU), run alternately.

    python bench/train.py [--batch 8] [--seq 256] [--steps 5] [--rounds 2] [--no-torch]

One full step each (forward, backward, AdamW update) on synthetic tokens. A float32 and a
bfloat16 (f32 accumulation) matmul ceiling is measured before and after, so a noisy host
shows. Prints one JSON line per (implementation, dtype) with the median step time over all
rounds, tokens/s, model TFLOP/s (``scaling.flops``), MFU against the measured ceiling of
that dtype, compile time, and moela's ratio to transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moela.parallel.host import active_allocator, fast_allocator  # noqa: E402

fast_allocator()  # both implementations run in this process, under the same allocator

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moela.configs import load  # noqa: E402
from moela.model.transformer import init_model  # noqa: E402
from moela.model.flops import training_flops_per_token  # noqa: E402
from moela.training.metrics import measure_matmul_flops  # noqa: E402
from moela.training.optim import optimizer  # noqa: E402
from moela.training.step import make_train_step  # noqa: E402


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens, one document per row: the batch every training-step benchmark times."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.float32)}


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


def torch_stepper(cfg, batch_np):
    import torch
    import transformers

    from moela.model.hf_import import hf_config_kwargs

    hf_cfg = transformers.DeepseekV3Config(**hf_config_kwargs(cfg.model))
    torch.set_num_threads(2)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.tensor(batch_np["inputs"], dtype=torch.long)
    labels = torch.tensor(batch_np["targets"], dtype=torch.long)

    def run():
        logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    base = load(args.config, [f"train.global_batch_size={args.batch}", f"train.seq_len={args.seq}"])
    batch = synthetic_batch(base.model.vocab_size, args.batch, args.seq)
    ceilings = {"float32": [measure_matmul_flops(jnp.float32, 2048)],
                "bfloat16": [measure_matmul_flops(jnp.bfloat16, 2048)]}
    runners = {}
    for dt in ("float32", "bfloat16"):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, compute_dtype=dt))
        runners[("moela", dt)] = moela_stepper(cfg, batch)
    if not args.no_torch:
        try:
            runners[("transformers", "float32")] = torch_stepper(base, batch)
        except ImportError as e:
            print(json.dumps({"bench": "train_step", "skipped": "transformers", "reason": str(e)}))
    samples: dict = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, (run, _) in runners.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run()
                samples[key].append(time.perf_counter() - t0)
    ceilings["float32"].append(measure_matmul_flops(jnp.float32, 2048))
    ceilings["bfloat16"].append(measure_matmul_flops(jnp.bfloat16, 2048))
    flops = training_flops_per_token(base.model, args.seq)["total"]
    tokens_per_step = args.batch * args.seq
    medians = {key: statistics.median(v) for key, v in samples.items()}
    for (impl, dt), step_s in medians.items():
        tps = tokens_per_step / step_s
        ceiling = max(ceilings[dt])
        record = {
            "bench": "train_step", "config": args.config, "impl": impl, "dtype": dt, "batch": args.batch,
            "seq": args.seq, "step_s_median": round(step_s, 4), "tokens_per_s": round(tps, 1),
            "model_tflops_per_s": round(flops * tps / 1e12, 4),
            "mfu_vs_measured_ceiling": round(flops * tps / ceiling, 4),
            "ceiling_gflops_before_after": [round(c / 1e9) for c in ceilings[dt]],
            "first_step_s (compile)": round(runners[(impl, dt)][1], 2), "samples": len(samples[(impl, dt)]),
            "allocator": active_allocator(),
        }
        if impl == "moela" and ("transformers", "float32") in medians:
            record["speedup_vs_transformers_float32"] = round(medians[("transformers", "float32")] / step_s, 3)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
