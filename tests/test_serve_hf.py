"""Greedy generation of an imported tiny DeepSeek-V3 equals transformers' ``generate`` token for
token, for prompts of different lengths served in one batch (chunked prefill included)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moela.configs.schema import ServeConfig  # noqa: E402
from moela.inference.engine import Engine  # noqa: E402
from moela.inference.scheduler import Request  # noqa: E402
from moela.model.checkpoint import load_model  # noqa: E402
from moela.model.hf_import import import_checkpoint  # noqa: E402
from tests.test_hf_parity import BASE, CASES, build_hf  # noqa: E402

NEW_TOKENS = 10


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qlora_yarn_groups_dense1", "direct_q_plain_dense2"])
def test_engine_greedy_equals_transformers_generate(case, tmp_path):
    hf_model = build_hf("v3", CASES[case], seed=11)
    hf_model.save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "moela", log=lambda *_: None)
    cfg, model = load_model(tmp_path / "moela")
    eos = hf_model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    cfg = dataclasses.replace(
        cfg,
        serve=ServeConfig(
            page_size=8, num_pages=32, max_batch=4, max_batched_tokens=32, eos_id=-1 if eos is None else int(eos)
        ),
    )
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, BASE["vocab_size"], n).tolist() for n in (5, 41, 1, 17)]
    results = Engine(model, cfg).generate([Request(str(i), p, NEW_TOKENS, index=i) for i, p in enumerate(prompts)])
    assert len({t for r in results for t in r.tokens}) > 8, "degenerate generations would prove little"
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0
            )
        want = out[0, len(prompt) :].tolist()
        if eos is not None and want and want[-1] == eos:
            want = want[:-1]
        assert result.tokens == want, f"prompt of {len(prompt)} tokens: {result.tokens} != {want}"
