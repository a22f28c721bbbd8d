"""Data layer: the local-text tfds builder, the sentencepiece tokenizer (bounded training), packing
row by row against the whole-list reference, global batch assembly."""

from __future__ import annotations

import json as json_module
import shutil
from pathlib import Path

import numpy as np
import pytest

from moela.configs import load
from moela.data import tokenizer as spm_tokenizer
from moela.configs.schema import MeshConfig
from moela.data.packing import Packer, concat
from moela.data.pipeline import get_tokenizer, process_span, sample_lines, to_global, unigram_entropy
from moela.data.sources import open_sources
from moela.data import text_builder
from moela.data.text_builder import DataError, build, split_files
from tests.packing_reference import pack_documents, stream

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
    got = {r["path"].decode(): r["text"].decode() for s in ("train", "validation") for r in sources[s]}
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
        open_sources(cfg.data, "train")


def test_tokenizer_trains_on_a_bounded_sample_round_trips_and_has_explicit_ids(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path)
    sources = open_sources(cfg.data, "train")
    tok = get_tokenizer(cfg, sources)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (spm_tokenizer.PAD, spm_tokenizer.BOS, spm_tokenizer.EOS)
    assert tok.vocab_size == 512
    text = "def f(x):\n    return {'é': x ** 2}  # ünïcödé ✓\n\n\tdone\n"
    assert tok.decode(tok.encode(text)) == text
    # cached beside the dataset and reloaded, not retrained
    assert Path(tok.path).parent == sources[0].directory
    assert get_tokenizer(cfg, sources).path == tok.path
    with pytest.raises(DataError, match="has 512 pieces but model.vocab_size is 300"):
        get_tokenizer(cfg_for(corpus, tmp_path, "model.vocab_size=300", f"data.tokenizer_model={tok.path}"))
    with pytest.raises(DataError, match="not found"):
        spm_tokenizer.load(tmp_path / "missing.model")
    # the sample is bounded by data.tokenizer_sentences, drawn from shuffled records (not the first file)
    total = sum(1 for i in range(len(sources[0])) for line in sources[0][i].splitlines() if line.strip())
    small = cfg_for(corpus, tmp_path, "data.tokenizer_sentences=300")
    lines = list(sample_lines(small, sources))
    assert len(lines) == 300 < total
    first = [line for line in sources[0][0].splitlines() if line.strip()][:300]
    assert lines != first
    assert len(list(sample_lines(cfg_for(corpus, tmp_path, "data.tokenizer_sentences=10000000"), sources))) == total


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


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_the_streaming_packer_makes_the_reference_rows_and_resumes_from_any_row(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(4, 100, rng.integers(0, 40)).astype(np.int32) for _ in range(60)]
    want = pack_documents(docs, seq_len, eos_id=3, bos_id=2)

    def rows_from(position=0, offset=0, limit=None):
        packer = Packer(((0, d) for d in docs[position:]), seq_len, 3, 2, position=position, offset=offset)
        out, states = [], []
        while limit is None or len(out) < limit:
            states.append(packer.state())
            made = packer.row()
            if made is None:
                break
            out.append(made[0])
            assert made[1].sum() == (made[0].segment_ids > 0).sum()  # tokens counted per source
        return concat(out), states

    got, states = rows_from()
    for field in ("inputs", "targets", "segment_ids", "positions"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    for r in range(0, len(want), 3):  # restart from the state before row r: the same rows follow
        again, _ = rows_from(states[r]["position"], states[r]["offset"])
        np.testing.assert_array_equal(again.targets, want.targets[r:])
        np.testing.assert_array_equal(again.segment_ids, want.segment_ids[r:])


def test_global_batch_is_assembled_from_process_rows():
    from moela.parallel.layout import Layout
    from moela.parallel.mesh import build_mesh
    from moela.parallel.sharded import batch_sharding

    rows = pack_documents([[i % 50 + 4] * 7 for i in range(40)], 8, eos_id=3).take(slice(8, 16))
    sharding = batch_sharding(Layout.of(build_mesh(MeshConfig(data=4, tensor=2, sequence=1)), "tp"))
    span = process_span(sharding, (8, 8))
    assert span == (0, 8)  # one process holds every device
    batch = to_global(rows.take(slice(*span)).as_batch(), sharding, 8)
    np.testing.assert_array_equal(np.asarray(batch["targets"]), rows.targets)
    assert batch["inputs"].sharding == sharding
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 8)}


def test_unigram_entropy():
    assert unigram_entropy(np.bincount(np.arange(8) % 4, minlength=16)) == pytest.approx(np.log(4))
    assert unigram_entropy(np.bincount(np.zeros(10, np.int64), minlength=16)) == pytest.approx(0.0)
