"""Data layer: the local-text tfds builder, the sentencepiece tokenizer, packing, deterministic batches."""

from __future__ import annotations

import json as json_module
import shutil
from pathlib import Path

import numpy as np
import pytest

from moela.configs import load
from moela.data import tokenizer as spm_tokenizer
from moela.data.packing import pack_documents, stream
from moela.configs.schema import MeshConfig
from moela.data.pipeline import Batches, eval_batch, prepare, process_span, to_global, unigram_entropy
from moela.data.sources import document, open_split
from moela.data import text_builder
from moela.data.text_builder import DataError, build, split_files

CORPUS_SRC = Path(json_module.__file__).parent  # a few stdlib files: the same text on every machine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(sorted(CORPUS_SRC.glob("*.py"))):
        (root / "sub").mkdir(exist_ok=True)
        shutil.copy(f, (root / "sub" if i % 2 else root) / f.name.replace(".py", ".txt"))
    return root


def cfg_for(corpus: Path, data_dir: Path, *extra):
    return load(
        "tiny",
        [
            f"data.text_glob={corpus}/**/*.txt",
            f"data.data_dir={data_dir}",
            "model.vocab_size=512",
            "train.seq_len=64",
            *extra,
        ],
    )


def test_builder_reads_every_file_once_with_a_stable_split(corpus, tmp_path, capfd):
    lines = []
    builder = build(f"{corpus}/**/*.txt", str(tmp_path), log=lines.append)
    # one line of moela's own, none of tfds' ("Downloading and preparing dataset Unknown size ...")
    n_files = len(list(corpus.rglob("*.txt")))
    assert len(lines) == 1 and lines[0].startswith(f"building the moela_text dataset from {n_files} files"), lines
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err and "absl" not in out + err and "Generating" not in out + err, out + err
    sources = builder.as_data_source()
    got = {document(r, "path"): document(r, "text") for s in ("train", "validation") for r in sources[s]}
    files = sorted(corpus.rglob("*.txt"))
    assert sorted(got) == sorted(str(f.relative_to(corpus)) for f in files)
    for f in files:
        assert got[str(f.relative_to(corpus))] == f.read_text()
    assert len(sources["validation"]) >= 1 and len(sources["train"]) >= 1
    # same split whatever the order files are found in
    names = [str(f) for f in files]
    assert split_files(names, str(corpus), 2) == split_files(names[::-1], str(corpus), 2)
    # prepared once, then reused
    again = build(f"{corpus}/**/*.txt", str(tmp_path))
    assert again.data_dir == builder.data_dir


def test_bad_sources_fail_clearly_and_leave_nothing(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match="matches no files"):
        build(f"{tmp_path}/nothing/*.txt", str(data_dir))
    assert not data_dir.exists(), "a failed build must not leave its folders behind"
    # a build that fails midway (an unreadable file) removes what it created, and only that
    data_dir.mkdir()
    (data_dir / "keep.txt").write_text("someone else's")
    texts = tmp_path / "texts"
    texts.mkdir()
    for name in "abc":
        (texts / f"{name}.txt").write_text("fine")

    def unreadable(self, files, root):
        yield "a.txt", {"text": "fine", "path": "a.txt"}
        raise OSError("disk gone")  # a file that vanished or a disk that failed mid-build

    monkeypatch.setattr(text_builder.MoelaText, "_generate_examples", unreadable)
    with pytest.raises(OSError, match="disk gone"):
        build(f"{texts}/*.txt", str(data_dir), log=lambda line: None)
    assert sorted(p.name for p in data_dir.iterdir()) == ["keep.txt"]
    cfg = load("tiny", ["data.dataset=no_such_dataset_xyz", f"data.data_dir={tmp_path}"])
    with pytest.raises(DataError, match="not a known tfds dataset"):
        open_split(cfg.data, "train")


def test_tokenizer_trains_round_trips_and_has_explicit_ids(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    rows, tok = prepare(cfg, "train")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (spm_tokenizer.PAD, spm_tokenizer.BOS, spm_tokenizer.EOS)
    assert tok.vocab_size == 512
    text = "def f(x):\n    return {'é': x ** 2}  # ünïcödé ✓\n\n\tdone\n"
    assert tok.decode(tok.encode(text)) == text
    # cached beside the dataset and reloaded, not retrained
    assert Path(tok.path).parent == open_split(cfg.data, "train")[1]
    rows2, tok2 = prepare(cfg, "train")
    assert tok2.path == tok.path and np.array_equal(rows2.inputs, rows.inputs)
    with pytest.raises(DataError, match="has 512 pieces but model.vocab_size is 300"):
        prepare(cfg_for(corpus, tmp_path, "model.vocab_size=300", f"data.tokenizer_model={tok.path}"), "train")
    with pytest.raises(DataError, match="not found"):
        spm_tokenizer.load(tmp_path / "missing.model")


def test_packing_by_hand():
    rows = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]], 6, eos_id=3, bos_id=2)
    np.testing.assert_array_equal(rows.inputs, [[2, 5, 6, 7, 2, 8], [9, 2, 10, 11, 12, 13], [14, 15, 16, 0, 0, 0]])
    np.testing.assert_array_equal(rows.targets, [[5, 6, 7, 3, 8, 9], [3, 10, 11, 12, 13, 14], [15, 16, 3, 0, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(rows.loss_mask[2], [1, 1, 1, 0, 0, 0])


def test_packing_keeps_every_pair_in_order_and_restarts_positions():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(4, 100, rng.integers(0, 40))) for _ in range(50)]
    rows = pack_documents(docs, 16, eos_id=3)
    x, y, _ = stream(docs, eos_id=3)
    real = rows.segment_ids > 0
    np.testing.assert_array_equal(rows.inputs[real], x)
    np.testing.assert_array_equal(rows.targets[real], y)
    # within a segment positions count 0, 1, 2, ...; a new segment starts at 0
    for r in range(len(rows)):
        for s in set(rows.segment_ids[r]) - {0}:
            np.testing.assert_array_equal(
                rows.positions[r][rows.segment_ids[r] == s], np.arange((rows.segment_ids[r] == s).sum())
            )
    assert (rows.segment_ids == 0).sum() < 16  # padding only in the last row


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = pack_documents([[i % 50 + 4] * 7 for i in range(40)], 8, eos_id=3)
    n = len(rows)
    a, b = Batches(rows, 4, seed=1), Batches(rows, 4, seed=1)
    for step in (0, 3, 17, 5):
        np.testing.assert_array_equal(a.indices(step), b.indices(step))
        np.testing.assert_array_equal(a.local(step)["inputs"], rows.inputs[a.indices(step)])
    assert not np.array_equal(Batches(rows, 4, seed=2).indices(0), a.indices(0))
    # one epoch visits every row exactly once, across step boundaries
    steps = -(-n // 4)
    seen = np.concatenate([a.indices(s) for s in range(steps)])[:n]
    assert sorted(seen) == list(range(n))
    # each of 2 processes reads its half; together they are the global batch
    halves = [a.local(9, span)["inputs"] for span in ((0, 2), (2, 4))]
    np.testing.assert_array_equal(np.concatenate(halves), a.local(9)["inputs"])


def test_eval_batches_keep_their_shape_and_pad_without_loss():
    rows = pack_documents([[i % 50 + 4] * 7 for i in range(10)], 8, eos_id=3)
    n = len(rows)
    last = eval_batch(rows, n - 1, 4, (0, 4))
    assert last["inputs"].shape == (4, 8)
    np.testing.assert_array_equal(last["inputs"][0], rows.inputs[n - 1])
    assert last["loss_mask"][0].sum() > 0 and last["loss_mask"][1:].sum() == 0
    np.testing.assert_array_equal(eval_batch(rows, 0, 4, (2, 4))["inputs"], rows.inputs[2:4])


def test_global_batch_is_assembled_from_process_rows():
    from moela.parallel.layout import Layout
    from moela.parallel.mesh import build_mesh
    from moela.parallel.sharded import batch_sharding

    rows = pack_documents([[i % 50 + 4] * 7 for i in range(40)], 8, eos_id=3)
    sharding = batch_sharding(Layout.of(build_mesh(MeshConfig(data=4, tensor=2, sequence=1)), "tp"))
    span = process_span(sharding, (8, 8))
    assert span == (0, 8)  # one process holds every device
    batches = Batches(rows, 8, seed=3)
    batch = to_global(batches.local(5, span), sharding, 8)
    np.testing.assert_array_equal(np.asarray(batch["targets"]), rows.targets[batches.indices(5)])
    assert batch["inputs"].sharding == sharding
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 8)}


def test_unigram_entropy():
    assert unigram_entropy(np.arange(8) % 4, 16) == pytest.approx(np.log(4))
    assert unigram_entropy(np.zeros(10, np.int64), 16) == pytest.approx(0.0)
