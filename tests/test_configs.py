"""Typed configs: presets load, overrides parse by type, and mistakes fail with one clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moela.configs import Config, ConfigError, RuntimeConfig, apply_overrides, load, load_json, save_json
from moela.configs.loader import from_dict, to_dict
from moela.configs.migrate import MOVED

PRESETS = ["tiny", "tiny_mtp", "small", "bench", "deepseek_v3", "deepseek_v2_lite"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip_through_json(name, tmp_path):
    cfg = load(name)
    assert isinstance(cfg, Config) and cfg.name == name
    save_json(cfg, tmp_path / "c.json")
    assert load_json(tmp_path / "c.json") == cfg


def test_preset_by_bare_name_and_overrides_parse_by_type():
    cfg = load(
        "tiny",
        [
            "model.num_layers=4",
            "model.rope.theta=5e5",
            "model.tie_embeddings=true",
            "model.attention.kind=gqa",
            "model.attention.num_kv_heads=2",
            "train.out_dir=/tmp/x",
        ],
    )
    assert cfg.model.num_layers == 4 and cfg.model.rope.theta == 500000.0 and cfg.model.tie_embeddings is True
    assert cfg.model.attention.kind == "gqa" and cfg.model.attention.num_kv_heads == 2
    assert cfg.train.out_dir == "/tmp/x"
    # an int is a valid float; nothing else changed
    assert apply_overrides(cfg, ["train.learning_rate=1"]).train.learning_rate == 1.0
    base = load("tiny")
    assert cfg.model.moe == base.model.moe and cfg.data == base.data and cfg.model.d_model == base.model.d_model


@pytest.mark.parametrize(
    "override, needles",
    [
        (["model.num_layerz=4"], ["unknown config key 'model.num_layerz'", "did you mean 'num_layers'", "valid keys"]),
        (["modle.num_layers=4"], ["unknown config key 'modle.num_layers'", "model"]),
        (["model.num_layers=four"], ["'model.num_layers'", "cannot be read as int"]),
        (["model.num_layers=4.5"], ["'model.num_layers'", "int"]),
        (["model.tie_embeddings=maybe"], ["'model.tie_embeddings'", "bool"]),
        (["model.attention.kind=mha"], ["'model.attention.kind'", "'mla'", "'gqa'"]),
        (["model.param_dtype=float16"], ["'model.param_dtype'", "'float32'", "'bfloat16'"]),
        (["model.attention=mla"], ["is a section", "kind"]),
        (["model.num_layers.x=1"], ["is a value, not a section"]),
        (["model.num_layers"], ["section.key=value"]),
    ],
)
def test_bad_keys_and_types_name_the_key_and_the_valid_choices(override, needles):
    with pytest.raises(ConfigError) as err:
        load("tiny", override)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "override, needles",
    [
        (["model.moe.experts_per_token=9"], ["model.moe.experts_per_token", "<= model.moe.num_experts = 8"]),
        (["model.moe.n_group=3"], ["model.moe.n_group", "must divide model.moe.num_experts = 8", "[1, 2, 4, 8]"]),
        (["model.moe.topk_group=3"], ["model.moe.topk_group", "<= model.moe.n_group"]),
        (
            ["model.moe.n_group=4", "model.moe.topk_group=1", "model.moe.experts_per_token=3"],
            ["experts_per_token", "selected groups"],
        ),
        (["model.attention.qk_rope_head_dim=7"], ["qk_rope_head_dim", "must be even"]),
        (
            ["model.attention.kind=gqa", "model.attention.num_kv_heads=3"],
            ["model.attention.num_kv_heads", "must divide", "num_heads = 4", "[1, 2, 4]"],
        ),
        (["model.attention.kind=gqa", "model.attention.head_dim=9"], ["head_dim", "even"]),
        (["model.first_k_dense=3"], ["model.first_k_dense", "between 0 and model.num_layers = 2"]),
        (["model.d_model=0"], ["model.d_model", "> 0"]),
        (["model.rope.scaling=yarn", "model.rope.factor=0.5"], ["model.rope.factor", ">= 1"]),
        (["train.microbatches=3"], ["train.microbatches", "must divide train.global_batch_size = 8"]),
        (["train.seq_len=4096"], ["train.seq_len", "max_seq_len", "model.rope.scaling=yarn"]),
        (["mesh.data=-1", "mesh.tensor=-1"], ["at most one of mesh"]),
        (["serve.top_p=0"], ["serve.top_p"]),
    ],
)
def test_inconsistent_values_fail_before_compute(override, needles):
    with pytest.raises(ConfigError) as err:
        load("tiny", override)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_json_with_unknown_or_mistyped_keys_is_refused(tmp_path):
    data = to_dict(load("tiny"))
    data["model"]["attention"]["q_lora"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'model.attention.q_lora'"):
        from_dict(Config, data)
    data = to_dict(load("tiny"))
    data["model"]["vocab_size"] = "1024"
    with pytest.raises(ConfigError, match="'model.vocab_size' = '1024' has type str; expected int"):
        from_dict(Config, data)


def test_missing_preset_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        load("nope")
    assert "not found" in str(err.value) and "tiny" in str(err.value) and "deepseek_v3" in str(err.value)


def test_cli_reports_a_config_error_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "moela.model.params", "--config", "tiny", "--set", "model.moe.experts_per_token=20"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "model.moe.experts_per_token" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- model apart from runtime


OLD_KEYS = {
    ("model", "attention", "impl"): "interpret",
    ("model", "moe", "impl"): "ragged_dot",
    ("model", "moe", "block_rows"): 64,
    ("model", "moe", "expert_dispatch"): "gather",
    ("model", "remat"): "full",
    ("serve", "attention_impl"): "reference",
}


def old_config_json(cfg: Config) -> dict:
    """``cfg`` as a config.json from before the runtime section: execution settings inside model/serve."""
    data = to_dict(cfg)
    del data["runtime"]
    for path, value in OLD_KEYS.items():
        node = data
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = value
    return data


def test_a_config_written_before_the_runtime_section_loads_with_its_settings_moved(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old_config_json(load("tiny"))))
    notes = []
    cfg = load_json(path, log=notes.append)
    assert cfg.model == load("tiny").model  # the model's identity is untouched
    assert cfg.runtime == RuntimeConfig(
        attention="interpret",
        grouped_matmul="ragged_dot",
        grouped_block_rows=64,
        expert_dispatch="gather",
        remat="full",
        paged_attention="reference",
    )
    assert len(notes) == 1 and "model.attention.impl -> runtime.attention" in notes[0]
    assert "serve.attention_impl -> runtime.paged_attention" in notes[0]
    save_json(cfg, path)  # written back in the current layout: no note the next time
    assert load_json(path, log=notes.append) == cfg and len(notes) == 1


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_setting_a_moved_key_names_its_new_place(old, new):
    with pytest.raises(ConfigError, match=f"'{old}' has moved to '{new}'"):
        load("tiny", [f"{old}=1"])


def test_runtime_overrides_parse_and_validate():
    cfg = load("tiny", ["runtime.attention=reference", "runtime.remat=dots", "runtime.grouped_block_rows=32"])
    assert (cfg.runtime.attention, cfg.runtime.remat, cfg.runtime.grouped_block_rows) == ("reference", "dots", 32)
    assert cfg.model == load("tiny").model
    with pytest.raises(ConfigError, match="'runtime.attention' = 'flash' is not valid; expected one of 'auto'"):
        load("tiny", ["runtime.attention=flash"])
    with pytest.raises(ConfigError, match="'runtime.grouped_block_rows' = 0 must be > 0"):
        load("tiny", ["runtime.grouped_block_rows=0"])
    cfg = load("tiny", ["runtime.expert_dispatch=all_to_all", "runtime.expert_capacity=1.25"])
    assert (cfg.runtime.expert_dispatch, cfg.runtime.expert_capacity) == ("all_to_all", 1.25)


# ----------------------------------------------------------------------------- bad input, table-driven

# (overrides, what the one-line error must name: the key and what would be valid)
BAD_CONFIGS = [
    (["train.warmup_steps=400"], ["'train.warmup_steps' = 400", "between 0 and train.steps = 300"]),
    (["train.steps=0"], ["'train.steps' = 0", "> 0"]),
    (["train.eval_every=0"], ["'train.eval_every' = 0", "> 0"]),
    (["train.checkpoint_every=0"], ["'train.checkpoint_every'", "> 0"]),
    (["train.log_every=-1"], ["'train.log_every'", "> 0"]),
    (["train.keep_checkpoints=0"], ["'train.keep_checkpoints'", "> 0"]),
    (["train.learning_rate=inf"], ["'train.learning_rate' = inf", "finite"]),
    (["train.learning_rate=nan"], ["'train.learning_rate' = nan", "finite"]),
    (["train.min_lr_ratio=2"], ["'train.min_lr_ratio'", "[0, 1]"]),
    (["train.b2=1"], ["'train.b2'", "[0, 1)"]),
    (["train.weight_decay=-0.1"], ["'train.weight_decay'", ">= 0"]),
    (["train.grad_clip=-1"], ["'train.grad_clip'", ">= 0 (0 = off)"]),
    (["train.out_dir= "], ["'train.out_dir' is empty", "runs/"]),
    (["train.schedule=exp"], ["'train.schedule' = 'exp'", "'cosine', 'linear', 'constant'"]),
    (["model.vocab_size=1e9"], ["'model.vocab_size' = '1e9'", "int"]),
    (["model.moe.num_experts=-1"], ["'model.moe.num_experts' = -1", ">= 0"]),
    (["model.init_std=0"], ["'model.init_std'", "> 0"]),
    (["runtime.remat=some"], ["'runtime.remat' = 'some'", "'none', 'full', 'dots', 'dots_no_batch'"]),
    (["runtime.attention=cuda"], ["'runtime.attention' = 'cuda'", "'xla'", "'pallas'"]),
    (["runtime.grouped_block_rows=0"], ["'runtime.grouped_block_rows'", "> 0"]),
    (["runtime.expert_capacity=-0.5"], ["'runtime.expert_capacity' = -0.5", ">= 0 (0 = dropless"]),
    (["runtime.expert_dispatch=a2a"], ["'runtime.expert_dispatch' = 'a2a'", "'ring', 'gather', 'all_to_all'"]),
    (["mesh.strategy=zero"], ["'mesh.strategy' = 'zero'", "'fsdp'"]),
    (["mesh.tensor=0"], ["'mesh.tensor' = 0", ">= 1, or -1"]),
    (["serve.cache_dtype=int8"], ["'serve.cache_dtype' = 'int8'", "'float32', 'bfloat16'"]),
    (["serve.temperature=-1"], ["'serve.temperature'", ">= 0"]),
    (["data.tokenizer_type=wordpiece"], ["'data.tokenizer_type'", "'bpe', 'unigram'"]),
    (["data.max_documents=-3"], ["'data.max_documents'", ">= 0"]),
    (["data.workers=-1"], ["'data.workers'", ">= 0 (0 = no worker processes)"]),
    (["data.prefetch=0"], ["'data.prefetch'", "must be > 0"]),
    (["data.shards=3"], ["'data.shards' = 3", "must divide train.global_batch_size = 8"]),
    (["data.mixture=lm1b:0.5, c4/en"], ["'data.mixture'", "'c4/en' must be SOURCE:WEIGHT"]),
    (["data.mixture=lm1b:0"], ["'data.mixture'", "positive weight"]),
    (["=3"], ["'=3'", "section.key=value"]),
    (["model..d_model=3"], ["'model..d_model=3'", "section.key=value"]),
    (["train.steps=1=2"], ["'train.steps' = '1=2'", "int"]),
    (["model.attention.impl=xla"], ["'model.attention.impl'", "moved to 'runtime.attention'"]),
]


@pytest.mark.parametrize("overrides, needles", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_every_bad_config_is_one_line_naming_the_key_and_what_is_valid(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load("tiny", overrides)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


BAD_FILES = {
    "empty.py": ("", "must define get_config()"),
    "syntax.py": ("def get_config(:\n", "failed to import: SyntaxError"),
    "raises.py": (
        "def get_config():\n    raise RuntimeError('line one\\nline two')\n",
        "raised RuntimeError: line one line two",
    ),
    "wrong_type.py": ("def get_config():\n    return {'model': {}}\n", "returned dict, expected moela.configs.Config"),
    "nul.py": ("def get_config():\n    return 1\x00\n", "failed to import"),
    "config.txt": ("anything", "must be a Python file (.py)"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_broken_config_file_is_one_line_naming_the_file(name, tmp_path):
    text, needle = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert needle in str(err.value) and name in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_config_directory_or_json_garbage_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(str(tmp_path))
    good = json.dumps(to_dict(load("tiny")))
    for name, text, needle in [
        ("dup.json", '{"name": "a", "name": "b"}', "duplicate key(s) 'name'"),
        ("nul.json", good[:-1] + "\x00}", "cannot read config"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "cannot read config"),
        ("list.json", "[1, 2]", "must hold a JSON object"),
        ("nested.json", json.dumps({**json.loads(good), "model": [1, {}]}), "section 'model' must be a mapping"),
        ("latin1.json", "", "cannot read config"),
    ]:
        path = tmp_path / name
        path.write_bytes(b'{"name": "\xe9"}' if name == "latin1.json" else text.encode())
        with pytest.raises(ConfigError) as err:
            load_json(path)
        assert needle in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_train_cli_refuses_a_warmup_longer_than_the_run_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "moela.cli.train", "--config", "tiny", "--set", "train.steps=5"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "error: config key 'train.warmup_steps' = 20 must be between 0 and train.steps = 5" in out.stderr


def test_max_steps_env_caps_a_run_and_shrinks_its_intervals():
    from moela.configs.loader import cap_steps

    cfg = load("tiny")
    capped, note = cap_steps(cfg, {"MOELA_MAX_STEPS": "4"})
    t = capped.train
    assert (t.steps, t.warmup_steps, t.eval_every, t.checkpoint_every, t.log_every) == (4, 4, 4, 4, 4)
    assert t.eval_batches == 1
    assert note == "MOELA_MAX_STEPS=4: training 4 of the config's 300 steps"
    assert capped.model == cfg.model and capped.data == cfg.data
    assert cap_steps(cfg, {}) == (cfg, None) and cap_steps(cfg, {"MOELA_MAX_STEPS": "1000"}) == (cfg, None)
    for bad in ("0", "four", "-2"):
        with pytest.raises(ConfigError, match="MOELA_MAX_STEPS=.* must be an integer >= 1"):
            cap_steps(cfg, {"MOELA_MAX_STEPS": bad})
