"""Parameter counts from configs, checked against published figures and a hand count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moela.configs import load
from moela.model.params import count_params


def test_bench_shape_is_72_9m_total_45_4m_active():
    c = count_params(load("bench").model)
    # by hand: embeddings 2*32000*512; per layer MLA 721,216 (+ norms); 1 dense MLP 3*512*1536;
    # 5 MoE layers of router 16*512, 16 experts 3*512*256 and 1 shared expert 3*512*256
    assert c["total"] == 72_925_568
    assert c["active"] == 45_400_448
    assert c["embedding"] == c["lm_head"] == 32000 * 512
    assert c["routed_experts"] == 5 * 16 * 3 * 512 * 256


def test_deepseek_v3_is_671b_total_37b_active():
    c = count_params(load("deepseek_v3").model)
    assert round(c["total"] / 1e9) == 671  # DeepSeek-V3 report: 671B total (MTP module excluded)
    assert round(c["active"] / 1e9) in (37, 38) and 37.0e9 < c["active"] < 38.0e9  # "37B activated"


def test_deepseek_v3_with_its_mtp_module_is_the_released_685b():
    """The released checkpoint (685B on its model card) stores the MTP layer with its own copies of
    the embedding and head, which moela shares: 671B + the module's 11.6B + two [N, D] copies."""
    m = load("deepseek_v3", ["model.mtp_depth=1"]).model
    c, main = count_params(m), count_params(load("deepseek_v3").model)
    assert c["total"] - main["total"] == c["mtp"]
    d, f = 7168, 2048
    mla = d * 1536 + 1536 + 1536 * 128 * 192 + d * (512 + 64) + 512 + 512 * 128 * 256 + 128 * 128 * d
    moe = 256 * d + 3 * d * f + 256 * 3 * d * f  # router, one shared expert, 256 routed experts
    assert c["mtp"] == mla + moe + 2 * d + 2 * d * d + 3 * d  # + block norms, [2D -> D], the module's 3 norms
    copies = 2 * m.vocab_size * m.d_model
    # "685B, which includes 671B of the Main Model weights and 14B of the MTP Module weights" (its
    # README; the stored fp8 block scales add ~0.04B more)
    assert 684.0e9 < c["total"] + copies < 685.5e9 and 13.0e9 < c["mtp"] + copies < 14.5e9


def test_deepseek_v2_lite_is_15_7b_total():
    c = count_params(load("deepseek_v2_lite").model)
    assert round(c["total"] / 1e8) == 157  # 15.7B total
    assert round(c["active_non_embedding"] / 1e8) in (24, 25)  # "2.4B activated" (without the input table)


def test_tied_embeddings_drop_the_head_and_dense_models_are_all_active():
    tied = count_params(load("tiny", ["model.tie_embeddings=true"]).model)
    assert tied["lm_head"] == 0
    dense = count_params(load("tiny", ["model.moe.num_experts=0"]).model)
    assert dense["active"] == dense["total"] and dense["routed_experts"] == 0


@pytest.mark.parametrize("preset", ["tiny", "deepseek_v3"])
def test_cli_last_line_is_json_with_total_and_active(preset):
    out = subprocess.run(
        [sys.executable, "-m", "moela.model.params", "--config", preset], capture_output=True, text=True, check=True
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["total"] == count_params(load(preset).model)["total"] and "active" in last
    assert "total" in out.stdout.splitlines()[1] or "embedding" in out.stdout
