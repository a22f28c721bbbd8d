"""Accelerators as the step-time model sees them: peak FLOP/s, HBM, and the network.

Every number is the vendor's (or the JAX scaling book's, which tabulates the vendors') and is
cited where it is set. Conventions: FLOP/s are dense (no 2:4 sparsity) peaks per chip;
bandwidths are bytes/s **one way** (unidirectional), per link for TPU ICI and per chip for
NVLink and the scale-out network; HBM capacity in bytes as the vendor states it (GB = 1e9).

Two network shapes:

* ``torus``: TPU ICI, ``torus_dims`` (2 or 3) wrap-around dimensions, 2 links per dimension
  per chip of ``link_bw`` bytes/s each way. A mesh axis spanning d dimensions of side a moves
  an all-gather of V bytes in V/(2·d·link_bw) and an all-to-all of V bytes per chip in
  V·a/(8·d·link_bw)/... (see ``steptime.Network``).
* ``switch``: NVIDIA, ``node`` GPUs joined by NVLink (``link_bw`` per GPU each way), nodes
  joined by the scale-out network (``dcn_bw`` per GPU each way: one 400 Gb/s NIC per GPU).

``dcn_bw`` for TPUs is the data-center network per chip between slices (only multi-slice runs
use it). The efficiencies (what fraction of a peak a well-shaped op reaches) are the model's
assumptions, justified in ``steptime`` and docs/design.md#step-time-model, not chip data.

``cpu`` is this repository's test host (2 cores), measured by ``bench/steptime_cpu.py``, so the
model's terms can be checked where they can run.
"""

from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None  # dense fp8 peak (int8 for TPUs without fp8), FLOP/s; None: none
    hbm_bytes: float  # capacity, bytes (vendor GB)
    hbm_bw: float  # bytes/s
    network: str  # "torus" (TPU ICI), "switch" (NVLink domain + scale-out network) or "host" (CPU)
    link_bw: float  # bytes/s one way: per ICI link (torus) or per GPU into NVLink (switch)
    dcn_bw: float  # bytes/s one way per chip across slices / nodes
    torus_dims: int = 0  # torus: wrap-around dimensions (2 links each per chip)
    node: int = 0  # switch: GPUs per NVLink domain
    # The matrix unit's tile: a matmul dim is padded to a multiple of it (TPU MXU 128x128 up to v5p,
    # 256x256 from v6e: scaling book; NVIDIA wgmma tiles: 64), and the grouped matmul's row tile
    # (each expert's rows padded to it: megablox on TPU, 512; grouped GEMMs on GPU, 128).
    mxu: int = 128
    group_rows: int = 512
    # Assumed fractions of peak (steptime's justification): large bf16 matmuls, flash attention,
    # HBM streaming; and the latency of one collective step.
    matmul_eff: float = 0.9
    grouped_eff: float = 0.7  # the routed experts' grouped matmul (calibrated: steptime docstring)
    fp8_eff: float = 0.6  # fp8 matmuls, of the fp8 peak: the same operand traffic feeds twice the math
    attention_eff: float = 0.6
    # Flash attention's backward over its forward: 2.5 for a fused kernel (recompute S, then dV,
    # dP, dQ, dK: 5 matmuls over the forward's 2), 3.5 for separate dK/dV and dQ kernels that each
    # recompute S and dP (7 over 2): TPU splash attention's default (MaxText sa_use_fused_bwd_kernel
    # False).
    attention_bwd: float = 3.5
    hbm_eff: float = 0.8
    latency: float = 10e-6
    overlap: bool = True  # collectives run beside compute (DMA engines, NICs); not on a CPU host

    @property
    def chips_per_fast_domain(self) -> int:
        return self.node if self.network == "switch" else 0


# NVIDIA: tensor-core tiles of 64, grouped GEMM tiles of 128 rows, large bf16 GEMMs at ~75% of
# the dense peak (steptime's justification).
GPU = {"mxu": 64, "group_rows": 128, "matmul_eff": 0.75, "grouped_eff": 0.58, "attention_bwd": 2.5}
SB = "jax-ml.github.io/scaling-book"
CHIPS: dict[str, Chip] = {
    # TPU v4: 275 TFLOP/s bf16 (int8 the same, no fp8), 32 GiB HBM2 at 1200 GB/s, 3D torus of 6
    # neighbours (cloud.google.com/tpu/docs/v4); ICI 4.5e10 B/s one way per link (SB, "How to Think
    # About TPUs": Google gives only pod figures for v4); DCN ~6.25e9 B/s per chip (SB, generic).
    "v4": Chip("v4", 275e12, None, 32 * 2**30, 1.2e12, "torus", 4.5e10, 6.25e9, torus_dims=3),
    # TPU v5e: 197 TFLOP/s bf16, 393 TOP/s int8, 16 GB HBM2e at 819 GB/s, 2D torus, 4 ICI ports and
    # 400 GB/s bidirectional ICI per chip (= 5e10 B/s one way per link), 2 x 100 Gb/s NICs per
    # 8-chip host (= 3.125e9 B/s per chip) (cloud.google.com/tpu/docs/v5e).
    "v5e": Chip("v5e", 197e12, 393e12, 16 * GB, 8.19e11, "torus", 5e10, 3.125e9, torus_dims=2),
    # TPU v5p: 459 TFLOP/s bf16 (fp8 459), 95 GiB HBM2e at 2765 GB/s, 3D torus, 1200 GB/s
    # bidirectional ICI per chip over 6 links (= 1e11 B/s one way per link; SB: 9e10), DCN 50 Gb/s
    # per chip (cloud.google.com/tpu/docs/v5p and /tpu7x comparison table).
    "v5p": Chip("v5p", 459e12, 459e12, 95 * 2**30, 2.765e12, "torus", 1e11, 6.25e9, torus_dims=3),
    # TPU v6e (Trillium): 918 TFLOP/s bf16, 1836 TOP/s int8 (fp8 918), 32 GB HBM at 1638 GB/s, 2D
    # torus, 4 ports and 800 GB/s bidirectional ICI per chip (= 1e11 B/s one way per link), DCN
    # 100 Gb/s per chip (cloud.google.com/tpu/docs/v6e, /tpu7x); MXU 256x256 (SB).
    "v6e": Chip("v6e", 918e12, 918e12, 32 * GB, 1.638e12, "torus", 1e11, 12.5e9, torus_dims=2, mxu=256),
    # TPU7x (Ironwood): 2307 TFLOP/s bf16, 4614 fp8, 192 GiB HBM3e at 7380 GB/s, 1200 GB/s
    # bidirectional ICI per chip, DCN 100 Gb/s per chip (cloud.google.com/tpu/docs/tpu7x); a 3D torus
    # of 4x4x4 cubes as v5p (SB), so 6 links are assumed (= 1e11 B/s one way; SB: 9e10).
    "v7": Chip("v7", 2307e12, 4614e12, 192 * 2**30, 7.38e12, "torus", 1e11, 12.5e9, torus_dims=3, mxu=256),
    # A100 SXM 40/80 GB: 312 TFLOP/s bf16 dense, 1555 / 2039 GB/s HBM, NVLink 3 600 GB/s
    # bidirectional per GPU, one 200 Gb/s HDR NIC per GPU (NVIDIA A100 datasheet; DGX A100 guide).
    "a100-40gb": Chip("a100-40gb", 312e12, None, 40 * GB, 1.555e12, "switch", 300e9, 25e9, node=8, **GPU),
    "a100-80gb": Chip("a100-80gb", 312e12, None, 80 * GB, 2.039e12, "switch", 300e9, 25e9, node=8, **GPU),
    # H100 SXM: 989.4 TFLOP/s bf16 dense, 1979 fp8 dense (the datasheet's 1979 / 3958 are "with
    # sparsity"), 80 GB HBM3 at 3.35 TB/s; NVLink 4: 18 links x 25 GB/s each way = 450 GB/s one way
    # per GPU, 8 GPUs per NVSwitch node; one 400 Gb/s ConnectX-7 NIC per GPU (SB, "How to Think
    # About GPUs"; NVIDIA H100 datasheet).
    "h100": Chip("h100", 989e12, 1979e12, 80 * GB, 3.35e12, "switch", 450e9, 50e9, node=8, **GPU),
    # H200 SXM: H100's compute and network, 141 GB HBM3e at 4.8 TB/s (SB GPU tables; MLPerf H200
    # system description "18x 4th Gen NVLink, 900GB/s", "141 GB").
    "h200": Chip("h200", 989e12, 1979e12, 141 * GB, 4.8e12, "switch", 450e9, 50e9, node=8, **GPU),
    # B200 (HGX/DGX B200): 2250 TFLOP/s bf16 dense, 4500 fp8 dense, 8.0e12 B/s HBM (SB GPU tables),
    # 180 GB per GPU as DGX B200 ships it (SB says 192 GB); NVLink 5: 18 x 50 GB/s = 900 GB/s one
    # way, 8 per node; 8 x ConnectX-7 400 Gb/s per node (MLPerf "nebius_b200_n1" system file).
    "b200": Chip("b200", 2250e12, 4500e12, 180 * GB, 8.0e12, "switch", 900e9, 50e9, node=8, **GPU),
}


def chip(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; valid: {', '.join(CHIPS)}")
    return CHIPS[name]
