"""The streaming loader: disjoint shards, no token lost or repeated, exact resume from any state
(with worker processes and the row shuffle), mixture weights, fixed validation batches, and
one clear error for a bad record or a source that matches nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moela.configs import load
from moela.data.pipeline import get_tokenizer
from moela.data.sources import open_source, open_sources
from moela.data.stream import TrainStream, documents, eval_batches, gather_state, ordered
from moela.data.text_builder import DataError
from tests.packing_reference import pack_documents

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))


def doc_text(tag: str, i: int) -> str:
    rng = np.random.default_rng(i)
    return f"{tag}{i} " + " ".join(rng.choice(WORDS, int(rng.integers(3, 40))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jsonl")
    write_jsonl(root / "train-0.jsonl", [doc_text("a", i) for i in range(23)])
    write_jsonl(root / "train-1.jsonl", [doc_text("a", i) for i in range(23, 37)])
    write_jsonl(root / "validation-0.jsonl", [doc_text("v", i) for i in range(9)])
    write_jsonl(root / "other" / "train-0.jsonl", [doc_text("b", i) for i in range(50)])
    write_jsonl(root / "other" / "validation-0.jsonl", [doc_text("w", i) for i in range(5)])
    return root


def cfg_for(corpus: Path, *extra):
    return load(
        "tiny",
        [
            f"data.dataset=jsonl:{corpus}/{{split}}-*.jsonl",
            f"data.data_dir={corpus / 'tfds'}",
            "model.vocab_size=300",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tok(corpus):
    return get_tokenizer(cfg_for(corpus))


def stream(cfg, tok, span=None, shards=1, batch=4, seq_len=16, state=None, **kw):
    return TrainStream(
        open_sources(cfg.data, "train"), [1.0], tok, global_batch=batch, seq_len=seq_len, seed=7,
        span=span or (0, batch), shards=shards, state=state, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_shards_read_disjoint_records_whose_union_is_the_dataset(corpus, shards):
    (source,) = open_sources(cfg_for(corpus).data, "train")
    n = len(source)
    dataset = ordered([source], [1.0], 7, None)
    seen = []
    for s in range(shards):
        docs = documents(dataset, s, shards, 0, 0, 8)
        mine = [next(docs) for _ in range(len(range(s, n, shards)))]  # shard s's share of epoch 0
        seen.append({text.split()[0] for text in mine})
    assert sum(len(x) for x in seen) == n  # disjoint ...
    assert set().union(*seen) == {f"a{i}" for i in range(n)}  # ... and together every record
    whole = documents(dataset, 0, 1, 0, 0, 8)
    epochs = [[next(whole) for _ in range(n)] for _ in range(2)]
    assert epochs[0] != [source[i] for i in range(n)]  # shuffled ...
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])  # ... differently every epoch


def test_no_token_is_lost_or_repeated_over_an_epoch(corpus, tok):
    cfg = cfg_for(corpus)
    (source,) = open_sources(cfg.data, "train")
    docs = documents(ordered([source], [1.0], 7, None), 0, 1, 0, 0, 8)
    texts = [next(docs) for _ in range(len(source))]
    assert sorted(t.split()[0] for t in texts) == sorted(f"a{i}" for i in range(len(source)))
    want = pack_documents([tok.encode(t) for t in texts], 16, tok.eos_id, tok.pad_id, tok.bos_id)
    s = stream(cfg, tok)
    got = [s.next() for _ in range(len(want) // 4)]
    for name in ("inputs", "targets", "segment_ids", "positions"):
        np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), getattr(want, name)[: 4 * len(got)])
    s.close()


def test_shard_blocks_assemble_the_global_batch(corpus, tok):
    """Two shards in one process (data.shards=2) give the batches two processes give together."""
    cfg = cfg_for(corpus)
    whole = stream(cfg, tok, shards=2)
    halves = [stream(cfg, tok, span=span, shards=2) for span in ((0, 2), (2, 4))]
    for _ in range(5):
        batch = whole.next()
        parts = [h.next() for h in halves]
        for name in ("inputs", "segment_ids"):
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), batch[name])
    local = [h.state() for h in halves]
    merged = {**local[0], "streams": {**local[0]["streams"], **local[1]["streams"]}}
    assert gather_state(merged, 1) == gather_state(whole.state(), 1)
    with pytest.raises(DataError, match="run by no process"):
        gather_state(local[0], 1)


@pytest.mark.slow
def test_resume_from_any_state_is_exact_with_workers_and_the_row_shuffle(corpus, tok):
    cfg = cfg_for(corpus)
    ref = stream(cfg, tok, window=5)
    batches, states = [], []
    for _ in range(12):
        states.append(gather_state(ref.state(), 1))
        batches.append(ref.next())
    assert json.loads(json.dumps(states[-1])) == states[-1]  # the state is plain JSON
    for k in (0, 3, 7):
        again = stream(cfg, tok, window=5, workers=2, state=states[k])
        for j in range(k, 12):
            np.testing.assert_array_equal(again.next()["inputs"], batches[j]["inputs"], err_msg=f"{k}->{j}")
        again.close()
    # the shuffle moved rows around: the plain stream gives the same rows in another order
    plain = stream(cfg, tok)
    assert not np.array_equal(plain.next()["inputs"], batches[0]["inputs"])


def test_mixture_weights_are_respected_and_deterministic(corpus, tok):
    mix = f"jsonl:{corpus}/{{split}}-*.jsonl:0.25, jsonl:{corpus}/other/{{split}}-*.jsonl:0.75"
    cfg = cfg_for(corpus, f"data.mixture={mix}")
    sources = open_sources(cfg.data, "train")
    docs = documents(ordered(sources, [0.25, 0.75], 7, None), 0, 1, 0, 0, 8)
    first = [next(docs)[0] for _ in range(2000)]
    share = np.mean([t == "a" for t in first])
    assert abs(share - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 2000), share

    def run(state=None, steps=6):
        s = TrainStream(sources, [0.25, 0.75], tok, global_batch=4, seq_len=16, seed=7, span=(0, 4), shards=1,
                        state=state)  # fmt: skip
        out = [s.next()["inputs"] for _ in range(steps)]
        return out, gather_state(s.state(), 2)

    a, state = run()
    b, _ = run()
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    tokens = state["streams"][0]["tokens"]
    assert sum(tokens) == 6 * 4 * 16 and min(tokens) > 0  # every real target counted to its source
    c, _ = run(state, 2)
    d, _ = run(None, 8)
    np.testing.assert_array_equal(np.stack(c), np.stack(d[6:]))


def test_validation_batches_are_fixed_and_padded(corpus, tok):
    cfg = cfg_for(corpus)
    sources = open_sources(cfg.data, "validation")
    full, counts = eval_batches(sources, [1.0], tok, global_batch=4, seq_len=32, batches=50, span=(0, 4))
    half, counts2 = eval_batches(sources, [1.0], tok, global_batch=4, seq_len=32, batches=50, span=(2, 4))
    assert len(full) < 50 and np.array_equal(counts, counts2)
    for f, h in zip(full, half):
        np.testing.assert_array_equal(f["inputs"][2:], h["inputs"])
    total = sum(len(tok.encode(sources[0][i])) + 2 for i in range(len(sources[0]))) - len(sources[0])
    assert sum(b["loss_mask"].sum() for b in full) == counts.sum() == total  # every validation pair, once
    assert full[-1]["loss_mask"].sum() < 4 * 32  # the last batch is padded without loss


def test_bad_records_name_their_file_and_record(tmp_path, tok):
    bad = tmp_path / "bad" / "train-0.jsonl"
    write_jsonl(bad, [doc_text("a", i) for i in range(5)])
    lines = bad.read_text().splitlines()
    lines[2] = '{"text": "torn'
    bad.write_text("\n".join(lines) + "\n")
    cfg = load("tiny", [f"data.dataset=jsonl:{tmp_path}/bad/{{split}}-*.jsonl", "model.vocab_size=300"])
    s = TrainStream(open_sources(cfg.data, "train"), [1.0], tok, global_batch=4, seq_len=64, seed=0, span=(0, 4),
                    shards=1)  # fmt: skip
    with pytest.raises(DataError, match=rf"line 3 of {bad}: not JSON"):
        for _ in range(20):
            s.next()

    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "ar" / "train.array_record"
    path.parent.mkdir()
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(40):
        writer.write((doc_text("r", i) * 20).encode())
    writer.close()
    source = open_source(f"array_record:{path}", cfg.data, "train")
    assert source[3].startswith("r3 ")
    data = bytearray(path.read_bytes())
    for k in range(2000, 2300):  # inside the records, not the footer
        data[k] ^= 0x5A
    path.write_bytes(data)
    source = open_source(f"array_record:{path}", cfg.data, "train")
    messages = {source[i].message for i in range(len(source)) if not isinstance(source[i], str)}
    assert messages and all(f"of {path}: RuntimeError:" in m and m.startswith("record ") for m in messages), messages
    fresh = open_source(f"array_record:{path}", cfg.data, "train")
    path.unlink()  # a file that vanished after the run started
    assert fresh[5].message.startswith(f"record 5 of {path}: ")
    with pytest.raises(DataError, match=rf"'{path}' matches no files"):
        open_source(f"array_record:{path}", cfg.data, "train")


def test_sources_that_cannot_serve_a_split_stop_before_reading(tmp_path):
    cfg = load("tiny", [f"data.dataset=jsonl:{tmp_path}/nothing/*.jsonl"])
    with pytest.raises(DataError, match=r"matches no files"):
        open_sources(cfg.data, "train")
    with pytest.raises(DataError, match=r"has no '\{split\}' in its glob, so it has no 'validation' split"):
        open_sources(cfg.data, "validation")


def test_a_state_resumes_only_with_its_row_window(corpus, tok):
    cfg = cfg_for(corpus)
    s = stream(cfg, tok, window=4)
    s.next()
    state = gather_state(s.state(), 1)
    assert state["window"] == 4 and state["sources"] == [s.names[0]]
    with pytest.raises(DataError, match="data.shuffle_rows=8, but this run was streamed with row windows of 4"):
        stream(cfg, tok, window=8, state=state)
    s.close()
