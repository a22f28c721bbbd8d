"""Flash-attention kernels: FLOPs, HBM bytes, arithmetic intensity and roofline time on TPU v5p
and H100, per kernel and shape, plus the measured time of the ``xla`` backend on this CPU.

    python bench/kernels.py [--shapes NAME:B,T,S,H,G,Dqk,Dv,causal[,doc] ...] [--repeats 5]
                            [--measure-max 2e7] [--json-only] [--plot docs/kernel_roofline.png]

The Pallas kernels cannot run here (the interpreter's speed means nothing), so their cost is
modelled from the kernels' own block schedules:

* Visited block pairs come from the kernels' code: the TPU kernel's scalar-prefetched tables
  (``flash_tpu._Tables``), the GPU kernel's causal loop bounds and document spans
  (``flash_gpu._segments``); both skip the causal upper triangle and other documents.
  ``useful`` counts exactly the visible (query, key) pairs; ``executed`` counts whole visited
  blocks at the padded head dims (TPU: 192 -> 256; GPU: powers of two), i.e. what the MXU /
  tensor cores multiply.
* FLOPs per (query, key) pair: forward 2·(Dqk + Dv) (QKᵀ, PV); backward 8·Dqk + 6·Dv — the
  dq kernel recomputes QKᵀ and dO·Vᵀ and forms dS·K, the dk/dv kernel recomputes QKᵀ and
  dO·Vᵀ and forms Pᵀ·dO and dSᵀ·Q (seven matmuls, 3.5× the forward at Dqk = Dv).
* HBM bytes (kernel traffic only, per query head, with the dtype's width): forward reads Q
  once and K, V once per visited block, writes O and the log-sum-exp (lane-replicated
  float32 [T, 128] on TPU, [T] on GPU); the dq kernel reads Q, dO, lse, delta once and K, V
  per visited block, writes dQ; the dk/dv kernel reads K, V once per kv block and Q, dO,
  lse, delta per visited block, writes dK, dV. Not counted: the wrappers' transposes and pads
  (XLA ops, about one extra read + write of each input on TPU) and delta = rowsum(dO·O).
  Caches are not modelled: on a GPU, tiles re-read by neighbouring thread blocks often come
  from L2 (50 MB on H100), so the GPU rows' bytes and "memory" bounds are upper bounds.
* Roofline time = max(FLOPs / peak, bytes / bandwidth), bfloat16 peaks from the vendors'
  spec sheets: TPU v5p 459 TFLOP/s, 2,765 GB/s (cloud.google.com/tpu/docs/v5p); H100 SXM
  989 TFLOP/s dense, 3,350 GB/s (nvidia.com H100 datasheet). Real kernels reach 40-70% of
  it; the table says which bound applies and how far the useful work is from the executed.

Measured: ``kernels.attention(backend="xla")`` forward and forward + backward (jitted, float32,
median of ``--repeats`` after a warm-up) for shapes whose B·H·T·S is at most ``--measure-max``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moela import kernels
from moela.kernels import flash_gpu, flash_tpu
from moela.kernels.common import LANES, SUBLANES, fit_block, lane_aligned, pow2

CHIPS = {  # bfloat16 dense peak FLOP/s, HBM bytes/s
    "v5p": (459e12, 2765e9),
    "h100": (989e12, 3350e9),
}
SHAPES = {  # name: B, T, S, H, G, Dqk, Dv, causal, packed document length (0: one document)
    "mla_4k": (1, 4096, 4096, 16, 16, 192, 128, True, 0),
    "mla_4k_docs1k": (1, 4096, 4096, 16, 16, 192, 128, True, 1024),
    "mla_8k": (1, 8192, 8192, 16, 16, 192, 128, True, 0),
    "gqa_4k": (1, 4096, 4096, 32, 8, 128, 128, True, 0),
    "full_4k": (1, 4096, 4096, 16, 16, 128, 128, False, 0),
    "prefill_512_of_4k": (1, 512, 4096, 16, 16, 192, 128, True, 0),
    "cpu_mla_1k": (1, 1024, 1024, 4, 4, 192, 128, True, 0),
    "cpu_tiny": (8, 128, 128, 4, 4, 48, 32, True, 0),
}


def visible_pairs(t, s, causal, doc):
    """Exactly visible (query, key) pairs of one head: queries are the last t of s positions."""
    q_pos, k_pos = np.arange(t)[:, None] + (s - t), np.arange(s)[None, :]
    mask = np.ones((t, s), bool) if not causal else q_pos >= k_pos
    if doc:
        mask &= (q_pos // doc) == (k_pos // doc)
    return int(mask.sum())


def segments(b, t, s, doc):
    if not doc:
        return None, None
    ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) // doc, (b, s))
    return ids[:, s - t :], ids


def tpu_blocks(t, s, causal, doc, bq, bk, over):
    """(block pairs computed, blocks fetched along the sequential axis, geometry) of the TPU
    kernel, from its own tables: the body runs where causal visibility and segment ranges
    meet; the index maps fetch each block in [first, last] once (a whole empty range: one)."""
    q_seg, kv_seg = segments(1, t, s, doc)
    geo = flash_tpu._Geometry(t, s, fit_block(t, bq, SUBLANES), fit_block(s, bk, LANES), causal, doc > 0, 1.0)
    tb = flash_tpu._Tables.build(q_seg, kv_seg, geo, 1, over=over)
    q_lo, q_hi, kv_lo, kv_hi = (np.asarray(x[0]) for x in (tb.q_lo, tb.q_hi, tb.kv_lo, tb.kv_hi))
    i, j = np.arange(geo.nq)[:, None], np.arange(geo.nk)[None, :]
    meet = (q_lo[:, None] <= kv_hi[None]) & (kv_lo[None] <= q_hi[:, None])
    active = np.asarray(geo.visible(i, j)) & meet
    fetched = int((np.asarray(tb.last[0]) - np.asarray(tb.first[0]) + 1).sum())
    return int(np.broadcast_to(active, (geo.nq, geo.nk)).sum()), fetched, geo


def gpu_blocks(t, s, causal, doc, bq, bk, over):
    """(tile pairs computed, tiles loaded in the inner loops, geometry) of the GPU kernel: its
    causal loop bounds narrowed to the spans of tiles whose documents meet."""
    q_seg, kv_seg = segments(1, t, s, doc)
    geo = flash_gpu._geometry(t, s, bq, bk, causal, doc > 0, 1.0)
    n_par = geo.nq if over == "kv" else geo.nk
    first, last = np.zeros(n_par, int), np.full(n_par, (geo.nk if over == "kv" else geo.nq) - 1)
    if doc:
        _, _, span_first, span_last = flash_gpu._segments(q_seg, kv_seg, geo, geo.nq * geo.bq, geo.nk * geo.bk, over)
        first, last = np.asarray(span_first[0]), np.asarray(span_last[0])
    n = 0
    for x in range(n_par):
        lo, hi = (0, int(geo.kv_range(x)[1])) if over == "kv" else (int(geo.q_range(x)[0]), geo.nq)
        n += max(0, min(hi, int(last[x]) + 1) - max(lo, int(first[x])))
    return n, n, geo


def cost(shape, target, dtype_bytes=2):
    """Per-kernel dict of useful/executed FLOPs and HBM bytes for one shape on one target."""
    b, t, s, h, g, dk, dv, causal, doc = shape
    pairs = visible_pairs(t, s, causal, doc)
    if target == "tpu":
        bl = flash_tpu.BlockSizes()
        dkp, dvp, lse_width = lane_aligned(dk), lane_aligned(dv), LANES
        fwd_n, fwd_f, fwd = tpu_blocks(t, s, causal, doc, bl.block_q, bl.block_k, "kv")
        dq_n, dq_f, dq = tpu_blocks(t, s, causal, doc, bl.block_q_dq, bl.block_k_dq, "kv")
        dkv_n, dkv_f, dkv = tpu_blocks(t, s, causal, doc, bl.block_q_dkv, bl.block_k_dkv, "q")
    else:
        bl = flash_gpu.BlockSizes()
        dkp, dvp, lse_width = pow2(dk, 16), pow2(dv, 16), 1
        fwd_n, fwd_f, fwd = gpu_blocks(t, s, causal, doc, bl.block_q, bl.block_k, "kv")
        dq_n, dq_f, dq = gpu_blocks(t, s, causal, doc, bl.block_q_dq, bl.block_k_dq, "kv")
        dkv_n, dkv_f, dkv = gpu_blocks(t, s, causal, doc, bl.block_q_dkv, bl.block_k_dkv, "q")
    heads, e = b * h, dtype_bytes
    row_stats = 4 * 2  # lse and delta, float32
    out = {
        "flash_fwd": dict(
            useful=2 * pairs * (dk + dv) * heads,
            executed=2 * fwd_n * fwd.bq * fwd.bk * (dkp + dvp) * heads,
            bytes=heads * (t * dkp * e + fwd_f * fwd.bk * (dkp + dvp) * e + t * dvp * e + t * lse_width * 4),
        ),
        "flash_bwd": dict(
            useful=pairs * (8 * dk + 6 * dv) * heads,
            executed=heads
            * (dq_n * dq.bq * dq.bk * (4 * dkp + 2 * dvp) + dkv_n * dkv.bq * dkv.bk * (4 * dkp + 4 * dvp)),
            bytes=heads
            * (
                t * (2 * dkp + dvp) * e
                + t * row_stats
                + dq_f * dq.bk * (dkp + dvp) * e  # dq kernel
                + dkv_f * dkv.bq * ((dkp + dvp) * e + row_stats)
            )  # dk/dv: q, dO, stats per visit
            + b * g * 2 * s * (dkp + dvp) * e,
        ),  # dk/dv: K, V read and dK, dV written once per kv head
    }
    out["flash_fwd_bwd"] = {key: out["flash_fwd"][key] + out["flash_bwd"][key] for key in out["flash_fwd"]}
    return out, pairs


def measure(shape, repeats):
    """Median (forward ms, forward+backward ms) of the xla backend in float32 on this CPU."""
    b, t, s, h, g, dk, dv, causal, doc = shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in ((b, t, h, dk), (b, s, g, dk), (b, s, g, dv)))
    q_seg, kv_seg = segments(b, t, s, doc)
    attend = lambda q, k, v: kernels.attention(
        q,
        k,
        v,
        scale=dk**-0.5,
        causal=causal,
        q_segment_ids=q_seg,  # noqa: E731
        kv_segment_ids=kv_seg,
        backend="xla",
    )[0]
    fwd = jax.jit(attend)
    both = jax.jit(lambda q, k, v: jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))(q, k, v))
    times = []
    for fn in (fwd, both):
        jax.block_until_ready(fn(q, k, v))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            samples.append(time.perf_counter() - t0)
        times.append(1e3 * statistics.median(samples))
    return times


def plot(rows, path):
    """Roofline chart: each chip's attainable FLOP/s against arithmetic intensity, with every
    (kernel, shape) at its intensity and roofline-bound FLOP/s (executed FLOPs / roofline time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"v5p": "tab:blue", "h100": "tab:green"}
    markers = {"flash_fwd": "o", "flash_bwd": "s", "flash_fwd_bwd": "^"}
    x = np.logspace(0, 3.3, 200)
    for chip, (peak, bandwidth) in CHIPS.items():
        ax.plot(x, np.minimum(peak, x * bandwidth) / 1e12, color=colors[chip], label=f"{chip} roofline")
    for r in rows:
        if r["shape"].startswith("cpu_"):
            continue
        tflops = r["executed_gflop"] / r["roofline_us"] * 1e3  # GFLOP/µs = PFLOP/s
        ax.scatter(r["intensity_flop_per_byte"], tflops, color=colors[r["chip"]], marker=markers[r["kernel"]], s=25)
    for kernel, marker in markers.items():
        ax.scatter([], [], color="gray", marker=marker, label=kernel)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (executed FLOP / HBM byte)",
        ylabel="roofline TFLOP/s (bf16)",
        title="moela flash-attention kernels at training shapes (model)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[bench/kernels] wrote {path}", file=sys.stderr)


def parse_shape(text):
    name, dims = text.split(":")
    parts = dims.split(",")
    nums = [int(x) for x in parts[:7]]
    causal = parts[7].lower() in ("1", "true", "causal") if len(parts) > 7 else True
    return name, (*nums, causal, int(parts[8]) if len(parts) > 8 else 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", help="NAME:B,T,S,H,G,Dqk,Dv[,causal[,doc]] (default: the built-in list)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure-max", type=float, default=2e7, help="measure the xla backend when B*H*T*S <= this")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--plot", help="write a roofline chart (PNG) of the modelled kernels here")
    args = parser.parse_args(argv)
    shapes = dict(parse_shape(x) for x in args.shapes) if args.shapes else SHAPES
    rows = []
    for name, shape in shapes.items():
        b, t, s, h = shape[:4]
        measured = measure(shape, args.repeats) if b * h * t * s <= args.measure_max else (None, None)
        print(f"[bench/kernels] {name}: measured={measured}", file=sys.stderr, flush=True)
        for target, chip in (("tpu", "v5p"), ("gpu", "h100")):
            costs, pairs = cost(shape, target)
            peak, bandwidth = CHIPS[chip]
            for kernel, c in costs.items():
                compute_s, memory_s = c["executed"] / peak, c["bytes"] / bandwidth
                cpu_ms = {"flash_fwd": measured[0], "flash_fwd_bwd": measured[1]}.get(kernel)
                row = {
                    "bench": "flash_kernel",
                    "kernel": kernel,
                    "shape": name,
                    "target": target,
                    "chip": chip,
                    "B,T,S,H,G,Dqk,Dv": list(shape[:7]),
                    "causal": shape[7],
                    "doc_len": shape[8],
                    "visible_pairs_per_head": pairs,
                    "useful_gflop": round(c["useful"] / 1e9, 3),
                    "executed_gflop": round(c["executed"] / 1e9, 3),
                    "mbytes": round(c["bytes"] / 1e6, 3),
                    "intensity_flop_per_byte": round(c["executed"] / c["bytes"], 1),
                    "roofline_us": round(1e6 * max(compute_s, memory_s), 2),
                    "bound": "compute" if compute_s >= memory_s else "memory",
                    "cpu_xla_f32_ms": None if cpu_ms is None else round(cpu_ms, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.plot:
        plot(rows, args.plot)
    if not args.json_only:
        print(
            "\n| kernel | shape | target | useful / executed GFLOP | MB | FLOP/B | roofline µs | bound | CPU xla ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cpu = "" if r["cpu_xla_f32_ms"] is None else r["cpu_xla_f32_ms"]
            print(
                f"| {r['kernel']} | {r['shape']} | {r['chip']} | {r['useful_gflop']} / {r['executed_gflop']} | "
                f"{r['mbytes']} | {r['intensity_flop_per_byte']} | {r['roofline_us']} | {r['bound']} | {cpu} |"
            )


if __name__ == "__main__":
    main()
