"""Logits parity with Hugging Face transformers' DeepSeek-V3/V2 (PyTorch, CPU).

Tiny random models are built in-process with weights large enough that routing, YaRN and
the latent path all matter, saved with ``save_pretrained``, imported with
``model.hf_import`` and compared on several prompts. This is the proof that moela's MLA,
MoE and RoPE are DeepSeek's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moela.model.checkpoint import load_model  # noqa: E402
from moela.model.hf_import import UnsupportedCheckpoint, config_from_hf, import_checkpoint  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
YARN_V2 = dict(YARN, mscale=0.707, mscale_all_dim=0.707)

BASE = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=16,
    num_experts_per_tok=2,
    routed_scaling_factor=2.5,
    max_position_embeddings=256,
    norm_topk_prob=True,
)

CASES = {
    "qlora_yarn_groups_dense1": dict(
        q_lora_rank=24, rope_parameters=YARN, n_group=4, topk_group=2, first_k_dense_replace=1
    ),
    "direct_q_plain_dense2": dict(
        q_lora_rank=None, rope_parameters=PLAIN, n_group=2, topk_group=1, first_k_dense_replace=2
    ),
    "qlora_plain_dense2": dict(q_lora_rank=24, rope_parameters=PLAIN, n_group=1, topk_group=1, first_k_dense_replace=2),
    "direct_q_yarn_groups_dense1": dict(
        q_lora_rank=None,
        rope_parameters=YARN_V2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_experts_per_tok=3,
    ),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights at a scale where every path moves the logits; norms near 1; a non-zero router bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.rand(b.shape, generator=g))


def build_hf(kind: str, overrides: dict, seed: int):
    if kind == "v3":
        cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**{**BASE, **overrides})
        model = transformers.DeepseekV2ForCausalLM(cfg)
    model.eval()
    randomise(model, seed)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    t = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        # An explicit all-ones mask: generate/forward would otherwise mask tokens equal to pad_token_id.
        return model(t, attention_mask=torch.ones_like(t)).logits.float().numpy()


def prompts(vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (3, 24)), rng.integers(0, vocab, (1, 1)), rng.integers(0, vocab, (2, 57))]


def max_diff(hf_model, directory) -> float:
    _, model = load_model(directory)
    worst = 0.0
    for tokens in prompts(BASE["vocab_size"], 1):
        ref = hf_logits(hf_model, tokens)
        ours = np.asarray(model(jnp.asarray(tokens, jnp.int32))[0])
        assert ours.shape == ref.shape and ours.dtype == np.float32
        worst = max(worst, float(np.max(np.abs(ours - ref))))
        # the comparison must be discriminative: logits vary at O(1)
        assert np.std(ref) > 0.3
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepseek_v3_logits_match_transformers(case, tmp_path):
    hf_model = build_hf("v3", CASES[case], seed=zlib.crc32(case.encode()) % 1000)
    # small shards: the import must follow model.safetensors.index.json across files
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lambda *_: None)
    assert cfg.model.num_dense_layers == CASES[case]["first_k_dense_replace"]
    diff = max_diff(hf_model, tmp_path / "moela")
    print(f"\nparity {case}: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_deepseek_v2_softmax_group_limited_logits_match(tmp_path):
    overrides = dict(
        q_lora_rank=None,
        rope_parameters=YARN_V2,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        first_k_dense_replace=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    hf_model = build_hf("v2", overrides, seed=7)
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lambda *_: None)
    assert cfg.model.moe.score_func == "softmax" and cfg.model.moe.group_score == "max"
    diff = max_diff(hf_model, tmp_path / "moela")
    print(f"\nparity deepseek_v2: max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_logits_cli_matches_transformers(tmp_path):
    hf_model = build_hf("v3", CASES["qlora_yarn_groups_dense1"], seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    run = [sys.executable, "-m", "moela.model.hf_import", str(tmp_path / "hf"), str(tmp_path / "moela")]
    subprocess.run(run, check=True, capture_output=True)
    again = subprocess.run(run, capture_output=True, text=True)  # never overwrite silently
    assert again.returncode == 2 and "already holds a moela checkpoint" in again.stderr
    missing = subprocess.run(run[:3] + [str(tmp_path / "nowhere"), str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "config.json" in missing.stderr and "Traceback" not in missing.stderr
    tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 11)).astype(np.int32)
    np.save(tmp_path / "in.npy", tokens)
    cmd = [
        sys.executable,
        "-m",
        "moela.model.logits",
        "--checkpoint",
        str(tmp_path / "moela"),
        "--tokens",
        str(tmp_path / "in.npy"),
        "--out",
        str(tmp_path / "out.npy"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32 and out.shape == (2, 11, BASE["vocab_size"])
    np.testing.assert_allclose(out, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
    # a token id outside the vocabulary is refused with a message naming the range
    np.save(tmp_path / "bad.npy", tokens + BASE["vocab_size"])
    bad = subprocess.run(
        cmd[:6] + [str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o2.npy")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and f"[0, {BASE['vocab_size']})" in bad.stderr
    assert not (tmp_path / "o2.npy").exists()


def test_fp8_block_scaled_checkpoint_is_dequantised(tmp_path):
    """DeepSeek-V3 ships float8 weights with [128, 128]-block ``weight_scale_inv``: import dequantises."""
    from safetensors.torch import save_file

    hf_model = build_hf("v3", dict(CASES["qlora_plain_dense2"], hidden_size=160, intermediate_size=200), seed=5)
    hf_model.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    quantised = {}
    for name, w in state.items():
        if name.endswith("proj.weight") and w.ndim == 2:
            rows, cols = w.shape
            scale = torch.rand((-(-rows // 128), -(-cols // 128))) * 0.01 + 0.005
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
            q = (w / full).to(torch.float8_e4m3fn)
            quantised[name] = q
            quantised[name + "_scale_inv"] = scale
            state[name] = q.float() * full  # what the import must reconstruct
        else:
            quantised[name] = w
    for f in (tmp_path / "hf").glob("*.safetensors"):
        f.unlink()
    save_file(quantised, str(tmp_path / "hf" / "model.safetensors"))
    cfg_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    cfg_json["dtype"] = "float32"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg_json))
    import_checkpoint(tmp_path / "hf", tmp_path / "moela", dtype="float32", log=lambda *_: None)
    hf_model.load_state_dict(state)
    diff = max_diff(hf_model, tmp_path / "moela")
    assert diff < 1e-4


def test_unsupported_configs_are_refused_by_name():
    ok = {
        **BASE,
        "model_type": "deepseek_v3",
        "q_lora_rank": 24,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "rope_parameters": PLAIN,
    }
    config_from_hf(ok)
    for change, needle in [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
        ({"scoring_func": "sqrtsoftplus"}, "scoring_func"),
        ({"n_group": 3}, "n_group"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ]:
        with pytest.raises(UnsupportedCheckpoint, match=needle):
            config_from_hf({**ok, **change})


def test_hf_config_kwargs_round_trips_through_the_importer():
    """The benchmarks build transformers' model from ``hf_config_kwargs``: it must be the same shape."""
    from moela.configs import load
    from moela.model.hf_import import hf_config_kwargs

    cfg = load("bench").model
    hf = transformers.DeepseekV3Config(**hf_config_kwargs(cfg)).to_dict()
    back = config_from_hf(hf, dtype="float32")
    for field in ("vocab_size", "d_model", "num_layers", "first_k_dense", "d_ff", "attention", "moe"):
        got, want = getattr(back, field), getattr(cfg, field)
        if field == "moe":
            got, want = (
                (got.num_experts, got.experts_per_token, got.d_ff, got.n_group, got.topk_group),
                (want.num_experts, want.experts_per_token, want.d_ff, want.n_group, want.topk_group),
            )
        assert got == want, field
