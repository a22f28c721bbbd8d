"""Compile time of a forward+backward step against depth: scanned layers keep it flat.

    python bench/compile_time.py [--config tiny] [--layers 2,4,8,16] [--repeats 3]

Prints one JSON line per depth with the median lowering and compile seconds over repeats
(each repeat lowers and compiles afresh) and the HLO text size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from moela.parallel.host import fast_allocator


import jax
import jax.numpy as jnp
from flax import nnx

from moela.configs import load
from moela.model.transformer import Decoder


def measure(cfg, batch: int, seq: int) -> dict:
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def loss(p, r, tokens):
        model = nnx.merge(graphdef, p, r)
        return jnp.mean(model(tokens)[0] ** 2)

    fn = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    lowered = fn.lower(params, rest, jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    return {"lower_s": lower_s, "compile_s": time.perf_counter() - t0, "hlo_chars": len(lowered.as_text())}


def main() -> None:
    fast_allocator()  # re-executes once with the allocator train.py runs with (moela.parallel.host)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--layers", default="2,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    for n in [int(x) for x in args.layers.split(",")]:
        cfg = load(args.config, [f"model.num_layers={n}"]).model
        runs = [measure(cfg, args.batch, args.seq) for _ in range(args.repeats)]
        print(
            json.dumps(
                {
                    "bench": "compile_time",
                    "config": args.config,
                    "layers": n,
                    "repeats": args.repeats,
                    "lower_s_median": round(statistics.median(r["lower_s"] for r in runs), 3),
                    "compile_s_median": round(statistics.median(r["compile_s"] for r in runs), 3),
                    "hlo_chars": runs[0]["hlo_chars"],
                    "backend": jax.default_backend(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
