"""serve.py end to end on a tiny checkpoint with a sentencepiece tokenizer: input validation as
error records, output in input order, --resume, refusing to overwrite, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flax import nnx

from moela.cli import serve
from moela.configs import load
from moela.data import tokenizer as sp
from moela.inference.engine import greedy_reference
from moela.model.checkpoint import save_params
from moela.model.transformer import init_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    cfg = load("tiny")
    source = Path(json.__file__).parent  # text every Python has
    lines = [line for f in sorted(source.glob("*.py")) for line in f.read_text().splitlines()]
    sp.train(lines, out / "tokenizer.model", cfg.model.vocab_size)
    model = init_model(cfg.model, seed=3)
    save_params(out, cfg, nnx.state(model))
    return out, model


LINES = [
    '{"id": "a", "prompt": "def load(", "max_tokens": 6}',
    "a plain text prompt",
    '{"id": "b", "tokens": [5, 6, 7], "max_tokens": 5, "temperature": 0.8, "seed": 3, "top_k": 40}',
    '{"id": "c", "prompt": ""}',
    '{"id": "d", "prompt": "x", "colour": 1}',
    '{"id": "e", "prompt": "import json", "top_p": 2}',
    "{not json",
    "",
    '{"id": "f", "tokens": [9, 10], "max_tokens": 4}',
    '{"id": "a", "tokens": [1], "max_tokens": 2}',
    '{"id": "g", "tokens": [1, 2, 3], "max_tokens": 0}',
    '{"id": "h", "tokens": [7, 7, 7, 7, 7, 7, 7, 7, 7, 7], "max_tokens": 3, "stop": "}"}',
    '{"id": "long", "tokens": ' + json.dumps([4] * 300) + "}",
]
ERRORS = {
    "c": "empty prompt",
    "d": "unknown field",
    "e": "top_p",
    "6": "malformed JSON",
    "a": "duplicate id",
    "g": "max_tokens",
    "long": "context",
}


def run(checkpoint_dir, prompts: Path, out: Path, *extra) -> dict:
    argv = [
        "--checkpoint",
        str(checkpoint_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--quiet",
        "--set",
        "serve.max_batch=4",
        "--set",
        "serve.max_batched_tokens=16",
        *extra,
    ]
    assert serve.main(argv) == 0
    return argv


def test_serve_writes_ordered_records_errors_and_summary(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out.jsonl"
    run(ckpt, prompts, out)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == sorted(r["index"] for r in records), "records must be in input order"
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    for rid, message in ERRORS.items():
        assert any(message in r.get("error", "") for r in by_id[rid]), (rid, by_id[rid])
    assert by_id["f"][0]["tokens"] == greedy_reference(model, [9, 10], 4)
    assert by_id["f"][0]["finish_reason"] == "length" and by_id["f"][0]["completion_tokens"] == 4
    assert by_id["1"][0]["text"] is not None and by_id["1"][0]["prompt_tokens"] > 0
    assert len(by_id["b"][0]["tokens"]) == 5 and by_id["b"][0]["ttft_s"] > 0
    assert summary["requests"] == 5 and summary["errors"] == len(ERRORS)
    assert summary["generated_tokens"] == sum(len(r.get("tokens", [])) for r in records)
    assert set(summary["ttft_s"]) == {"p50", "p90", "p99"} and summary["peak_pages"] > 0

    # a second run must not overwrite; --resume skips what is there and adds only the new line
    assert serve.main(["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 2
    before = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": "torn", "tex')  # a crash mid-write
    prompts.write_text("\n".join(LINES + ['{"id": "new", "tokens": [3, 4], "max_tokens": 2}']) + "\n")
    run(ckpt, prompts, out, "--resume")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] == 1 and summary["skipped"] > 0
    after = out.read_text()
    assert after.startswith(before.rstrip("\n").rsplit("\n", 1)[0]) and '"new"' in after and "torn" not in after


def test_serve_rejects_model_overrides_and_missing_checkpoint(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    argv = ["--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    assert serve.main(["--checkpoint", str(ckpt), "--set", "model.num_layers=3", *argv]) == 2
    assert "only serve.*" in capsys.readouterr().err
    assert serve.main(["--checkpoint", str(tmp_path / "nothing"), *argv]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_serve_runs_under_any_runtime_and_mesh(checkpoint, tmp_path, capsys):
    """The same checkpoint served with another paged-attention backend, and tensor parallel over two
    devices (mesh.* as train.py reads it), gives the same greedy tokens; a mesh that would split the
    packed batch is refused with the reason."""
    ckpt, model = checkpoint
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "x", "tokens": [9, 10, 11], "max_tokens": 5}\n{"id": "y", "tokens": [4], "max_tokens": 5}\n'
    )
    want = {"x": greedy_reference(model, [9, 10, 11], 5), "y": greedy_reference(model, [4], 5)}
    for i, extra in enumerate(
        [["runtime.paged_attention=reference"], ["mesh.tensor=2", "mesh.strategy=tp", "runtime.paged_attention=xla"]]
    ):
        out = tmp_path / f"out{i}.jsonl"
        run(ckpt, prompts, out, *[x for e in extra for x in ("--set", e)])
        got = {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}
        assert got == want, extra
    capsys.readouterr()
    argv = ["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--quiet"]
    assert serve.main([*argv, "--set", "mesh.data=2"]) == 2
    assert "mesh.data and mesh.sequence must be 1" in capsys.readouterr().err
    assert serve.main([*argv, "--set", "runtime.paged_attention=flash"]) == 2
    assert "'runtime.paged_attention' = 'flash' is not valid" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input, table-driven

# one prompts file: malformed lines (with what their one-line error must say) among good ones (None)
MIXED: list[tuple[bytes, str | None]] = [
    (b'{"id": "good1", "prompt": "def main(", "max_tokens": 3}', None),
    (b"\xff\xfe not utf-8 \xc3", "not valid UTF-8: byte 0xff at byte offset 0"),
    (b"import os\r", None),  # a CRLF line is plain text
    (b"hello\x00world", "NUL byte at character 5"),
    (b"[1, 2, 3]", "must be an object like"),
    (b"42", None),  # not { or [: plain text, by the rule
    (b'"a quoted line"', None),
    (b'{"id": "dup", "prompt": "a", "prompt": "b"}', "duplicate key(s) 'prompt'"),
    (b'{"id": {"x": 1}, "prompt": "a"}', "'id' must be a non-empty string or an integer"),
    (b'{"id": "nested", "prompt": {"text": "a"}}', "'prompt' must be a string"),
    (b'{"id": "lists", "tokens": [[1, 2], [3]]}', "'tokens' must be a list of integer token ids"),
    (b'{"id": "oov", "tokens": [1, 99999, 2, -4]}', "[0, 1024); got 99999 at position 1, -4 at position 3"),
    (b'{"id": "hot", "prompt": "a", "temperature": "hot"}', "'temperature' must be a number >= 0; got 'hot'"),
    (b'{"id": "nan", "prompt": "a", "temperature": NaN}', "'temperature' must be a number >= 0; got nan"),
    (b'{"id": "seed", "prompt": "a", "seed": 18446744073709551616}', "'seed' must be an integer in [0, 2^32)"),
    (b'{"id": "bool", "prompt": "a", "max_tokens": true}', "'max_tokens' must be an integer >= 1"),
    (b'{"id": "stop", "prompt": "a", "stop": [1]}', "'stop' must be a non-empty string or a list of them"),
    (b'{"id": "both", "prompt": "a", "tokens": [1]}', "exactly one of 'prompt'"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"id": "torn", "prompt": "a"', "malformed JSON"),
    (b"x" * (4 * 1024 * 1024 + 1), "exceeds the limit of 4194304 bytes"),
    (b'{"id": "good2", "tokens": [5, 6, 7], "max_tokens": 2, "temperature": 0.7, "seed": 1}', None),
]


def test_every_malformed_line_gets_a_one_line_error_and_every_good_line_completes(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    prompts, out = tmp_path / "mixed.jsonl", tmp_path / "out.jsonl"
    prompts.write_bytes(b"\n".join(line for line, _ in MIXED) + b"\n")
    run(ckpt, prompts, out, "--set", "serve.max_new_tokens=3")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == list(range(len(MIXED))), "one record per non-blank line"
    for index, (line, needle) in enumerate(MIXED):
        record = records[index]
        if needle is None:
            assert "error" not in record and record["finish_reason"] in ("stop", "length"), (line[:60], record)
        else:
            assert needle in record["error"] and "\n" not in record["error"], (line[:60], record["error"])
    bad = sum(needle is not None for _, needle in MIXED)
    assert bad >= 12 and summary["errors"] == bad and summary["requests"] == len(MIXED) - bad


def test_unusable_paths_stop_before_the_model_loads_and_leave_nothing(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (tmp_path, tmp_path / "o1.jsonl", "is a directory; give a file with one request per line"),
        (tmp_path / "missing.txt", tmp_path / "o2.jsonl", "cannot read --prompts"),
        (good, tmp_path, "is a directory; give a file path"),
        (good, a_file / "out.jsonl", "is a file, not a directory"),
    ]
    for prompts, out, needle in cases:
        argv = ["--checkpoint", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--quiet"]
        assert serve.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "p.txt"], "nothing written"

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    run(ckpt, empty, tmp_path / "o.jsonl")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] == 0 and summary["errors"] == 0


def test_serve_speculates_with_the_mtp_module_and_reports_acceptance(tmp_path, capsys):
    """A checkpoint with an MTP module serves with serve.speculative_tokens: the greedy tokens are
    the plain loop's and the summary reports each draft position's acceptance rate; without a
    module the key is refused before the model loads."""
    cfg = load("tiny", ["model.mtp_depth=1"])
    model = init_model(cfg.model, seed=3)
    save_params(tmp_path / "mtp", cfg, nnx.state(model))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "f", "tokens": [9, 10], "max_tokens": 6}\n{"id": "g", "tokens": [3], "max_tokens": 5}\n')
    run(tmp_path / "mtp", prompts, tmp_path / "o.jsonl", "--set", "serve.speculative_tokens=2")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = summary["speculation"]
    assert spec["speculative_tokens"] == 2 and len(spec["acceptance_rate"]) == 2 and spec["verify_steps"] > 0
    assert 1.0 <= spec["tokens_per_verify_step"] <= 3.0
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert records["f"]["tokens"] == greedy_reference(model, [9, 10], 6)
    save_params(tmp_path / "plain", load("tiny"), nnx.state(init_model(load("tiny").model)))
    argv = ["--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"), "--set", "serve.speculative_tokens=2"]
    assert serve.main(["--checkpoint", str(tmp_path / "plain"), *argv]) == 2
    assert "needs an MTP module" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
