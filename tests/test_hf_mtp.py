"""Importing DeepSeek-V3's multi-token-prediction layer, checked against an independent reference.

transformers does not run the MTP module, so the reference is assembled from the report's
equations (arXiv:2412.19437 sec. 2.2) in float64:

    h^0 = the main model's final-normed hidden state      transformers, float64
    u_i = W_eh · [RMSNorm_e(Emb(t_{i+1})) ; RMSNorm_h(h^0_i)]   NumPy, float64
    logits = OutHead(RMSNorm_f(Block(u)))                  transformers' own decoder layer (MLA + MoE)
                                                           as a one-layer model fed ``inputs_embeds``

The checkpoint is written as DeepSeek-V3 ships it: ``model.layers.{L}`` holds the MTP block
beside ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the embedding and head.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from moela.model.checkpoint import load_model  # noqa: E402
from moela.model.hf_import import UnsupportedCheckpoint, import_checkpoint  # noqa: E402
from tests.test_hf_parity import BASE, CASES, hf_logits, randomise  # noqa: E402

LAYERS = 2  # main model; layer 2 of the saved model is the MTP block
OVERRIDES = {**CASES["qlora_yarn_groups_dense1"], "num_hidden_layers": LAYERS}


def rms(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def write_checkpoint(directory, *, head_copy_noise: float = 0.0, with_mtp: bool = True) -> dict:
    """A DeepSeek-V3-style checkpoint with one MTP layer; returns the float64 pieces of the reference."""
    full = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**{**BASE, **OVERRIDES, "num_hidden_layers": LAYERS + 1})
    )
    randomise(full, seed=3)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in full.state_dict().items()}
    g = np.random.default_rng(4)
    d = BASE["hidden_size"]
    mtp = {
        "enorm": 1.0 + 0.2 * g.standard_normal(d),
        "hnorm": 1.0 + 0.2 * g.standard_normal(d),
        "eh_proj": g.standard_normal((d, 2 * d)) / np.sqrt(2 * d),
        "final_norm": 1.0 + 0.2 * g.standard_normal(d),
    }
    main = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**{**BASE, **OVERRIDES}, experts_implementation="eager")
    )
    main.load_state_dict({k: torch.tensor(v) for k, v in state.items() if not k.startswith(f"model.layers.{LAYERS}.")})
    main.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    if with_mtp:
        prefix = f"model.layers.{LAYERS}."
        extra = {k: v for k, v in state.items() if k.startswith(prefix)}
        head = state["lm_head.weight"] + head_copy_noise
        extra.update(
            {
                prefix + "enorm.weight": mtp["enorm"],
                prefix + "hnorm.weight": mtp["hnorm"],
                prefix + "eh_proj.weight": mtp["eh_proj"],
                prefix + "shared_head.norm.weight": mtp["final_norm"],
                prefix + "shared_head.head.weight": head,
                prefix + "embed_tokens.weight": state["model.embed_tokens.weight"],
            }
        )
        extra = {k: np.ascontiguousarray(v, np.float32) for k, v in extra.items()}
        safetensors_numpy.save_file(extra, str(directory / "model-mtp.safetensors"))
    return {"state": state, "main": main, **mtp}


def reference_mtp_logits(ref: dict, tokens: np.ndarray) -> np.ndarray:
    """[B, T-1, N] float64: MTP logits at the positions whose next token is known."""
    eps = 1e-6
    main = ref["main"].double()
    state = ref["state"]
    with torch.no_grad():
        t = torch.tensor(tokens, dtype=torch.long)
        h0 = main.model(t, attention_mask=torch.ones_like(t)).last_hidden_state.numpy()
    emb = state["model.embed_tokens.weight"].astype(np.float64)[tokens[:, 1:]]
    u = np.concatenate([rms(emb, ref["enorm"], eps), rms(h0[:, :-1], ref["hnorm"], eps)], axis=-1) @ ref["eh_proj"].T
    # The MTP block as transformers runs a decoder layer: a one-layer model (its layer an MoE layer),
    # its final norm the MTP layer's shared_head.norm and its head the main model's.
    one = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **{**BASE, **OVERRIDES, "num_hidden_layers": 1, "first_k_dense_replace": 0},
            experts_implementation="eager",  # the grouped-mm path runs no float64
        )
    )
    weights = {k.replace(f"model.layers.{LAYERS}.", "model.layers.0."): v for k, v in state.items()}
    weights = {
        k: v
        for k, v in weights.items()
        if k.startswith("model.layers.0.") or k in ("lm_head.weight", "model.embed_tokens.weight")
    }
    weights["model.norm.weight"] = ref["final_norm"]
    missing = one.load_state_dict(
        {k: torch.tensor(np.asarray(v, np.float32)) for k, v in weights.items()}, strict=False
    )
    assert not [k for k in missing.missing_keys if "rotary" not in k], missing
    one = one.double().eval()
    with torch.no_grad():
        x = torch.tensor(u)
        logits = one(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).logits
    return logits.numpy()


def test_mtp_layer_imports_and_matches_the_report_equations(tmp_path):
    ref = write_checkpoint(tmp_path / "hf")
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lambda *_: None)
    assert cfg.model.mtp_depth == 1
    _, model = load_model(tmp_path / "moela")
    tokens = np.random.default_rng(5).integers(0, BASE["vocab_size"], (2, 19))
    x, _ = model.features(jnp.asarray(tokens, jnp.int32))
    hidden, _ = model.mtp_features(x, jnp.asarray(tokens, jnp.int32))
    ours = np.asarray(model.logits(hidden[0]), np.float64)[:, :-1]
    expected = reference_mtp_logits(ref, tokens)
    assert np.std(expected) > 0.3  # discriminative: logits vary at O(1)
    np.testing.assert_allclose(ours, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)
    # The main model is untouched by the MTP layer.
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens, jnp.int32))[0]), hf_logits(ref["main"].float(), tokens), atol=2e-5
    )


def test_mtp_copies_must_equal_the_shared_embedding_and_head(tmp_path):
    write_checkpoint(tmp_path / "hf", head_copy_noise=1e-3)
    with pytest.raises(UnsupportedCheckpoint, match=r"shared_head\.head\.weight' differs .*--no-mtp"):
        import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lambda *_: None)
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "lean", log=lambda *_: None, mtp=False)
    assert cfg.model.mtp_depth == 0 and load_model(tmp_path / "lean")[1].mtp is None


def test_config_naming_mtp_layers_the_shards_lack_imports_without_them(tmp_path):
    write_checkpoint(tmp_path / "hf", with_mtp=False)
    lines = []
    cfg = import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lines.append)
    assert cfg.model.mtp_depth == 0
    assert any("names 1 MTP layer(s)" in line and "importing 0" in line for line in lines)
