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
import time

from moela.parallel.host import active_allocator, fast_allocator


import jax.numpy as jnp

from harness import moela_stepper, synthetic_batch

from moela.configs import load
from moela.model.flops import training_flops_per_token
from moela.training.metrics import measure_matmul_flops


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
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
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
    ceilings = {
        "float32": [measure_matmul_flops(jnp.float32, 2048)],
        "bfloat16": [measure_matmul_flops(jnp.bfloat16, 2048)],
    }
    runners = {}
    for dt in ("float32", "bfloat16"):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, compute_dtype=dt))
        runners[("moela", dt)] = moela_stepper(cfg, batch)
    if not args.no_torch:
        try:
            runners[("transformers", "float32")] = torch_stepper(base, batch)
        except ImportError as e:  # the comparison is the point: say so, never skip it silently
            raise SystemExit(
                f"error: transformers' DeepseekV3 cannot run here ({type(e).__name__}: {e}); install "
                "the test extras (pip install -e '.[test]') or pass --no-torch to time moela alone"
            )
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
            "bench": "train_step",
            "config": args.config,
            "impl": impl,
            "dtype": dt,
            "batch": args.batch,
            "seq": args.seq,
            "step_s_median": round(step_s, 4),
            "tokens_per_s": round(tps, 1),
            "model_tflops_per_s": round(flops * tps / 1e12, 4),
            "mfu_vs_measured_ceiling": round(flops * tps / ceiling, 4),
            "ceiling_gflops_before_after": [round(c / 1e9) for c in ceilings[dt]],
            "first_step_s (compile)": round(runners[(impl, dt)][1], 2),
            "samples": len(samples[(impl, dt)]),
            "allocator": active_allocator(),
        }
        if impl == "moela" and ("transformers", "float32") in medians:
            record["speedup_vs_transformers_float32"] = round(medians[("transformers", "float32")] / step_s, 3)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
