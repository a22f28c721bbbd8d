"""bench/kernels.py's cost model: pair counts against brute force and closed forms, FLOPs per
pair, the TPU kernel's block skipping as its tables report it, the roofline's bound."""

from __future__ import annotations

import numpy as np
import pytest

from bench import kernels as bench


@pytest.mark.parametrize(
    "t,s,causal,doc",
    [(7, 7, True, 0), (5, 12, True, 0), (12, 5, True, 0), (9, 9, False, 0), (16, 16, True, 4), (8, 16, True, 5)],
)
def test_visible_pairs_brute_force(t, s, causal, doc):
    want = sum(
        1
        for i in range(t)
        for j in range(s)
        if (not causal or i + s - t >= j) and (not doc or (i + s - t) // doc == j // doc)
    )
    assert bench.visible_pairs(t, s, causal, doc) == want


def test_flops_per_pair_and_block_counts():
    shape = (2, 1024, 1024, 4, 2, 128, 128, False, 0)
    for target in ("tpu", "gpu"):
        costs, pairs = bench.cost(shape, target)
        assert pairs == 1024 * 1024
        assert costs["flash_fwd"]["useful"] == 2 * pairs * 256 * 8  # QKᵀ + PV, 8 (row, head) pairs
        assert costs["flash_bwd"]["useful"] == pairs * (8 * 128 + 6 * 128) * 8  # 3.5x the forward
        assert costs["flash_fwd"]["executed"] == costs["flash_fwd"]["useful"]  # no padding, nothing skipped
    causal = bench.cost((1, 4096, 4096, 16, 16, 192, 128, True, 0), "tpu")[0]["flash_fwd"]
    packed = bench.cost((1, 4096, 4096, 16, 16, 192, 128, True, 1024), "tpu")[0]["flash_fwd"]
    # 512-row blocks: the causal half leaves 36 of 64 block pairs, 1k documents leave 12
    per_block = 2 * 512 * 512 * (256 + 128) * 16
    assert causal["executed"] == 36 * per_block and packed["executed"] == 12 * per_block
    assert packed["bytes"] < causal["bytes"]
    gpu_causal = bench.cost((1, 4096, 4096, 16, 16, 192, 128, True, 0), "gpu")[0]["flash_fwd"]
    gpu_packed = bench.cost((1, 4096, 4096, 16, 16, 192, 128, True, 1024), "gpu")[0]["flash_fwd"]
    # 128 x 64 tiles: causal 32 q tiles x (2i + 2) KV tiles; 1k documents: 8 q tiles each over (2i' + 2), i' < 8
    per_tile = 2 * 128 * 64 * (256 + 128) * 16
    assert gpu_causal["executed"] == sum(2 * i + 2 for i in range(32)) * per_tile
    assert gpu_packed["executed"] == 4 * sum(2 * i + 2 for i in range(8)) * per_tile


def test_tpu_block_counts_come_from_the_kernels_tables():
    computed, fetched, geo = bench.tpu_blocks(1024, 1024, True, 0, 256, 256, "kv")
    assert (geo.nq, geo.nk) == (4, 4) and computed == 10 and fetched == 10
    computed, fetched, _ = bench.tpu_blocks(1024, 1024, True, 256, 256, 256, "kv")
    assert computed == fetched == 4  # one document per block: only the diagonal
    assert np.isclose(bench.CHIPS["v5p"][0] / bench.CHIPS["v5p"][1], 166, atol=1)  # v5p ridge point, FLOP/byte
