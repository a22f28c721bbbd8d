"""The training loop: learning, exact gradients, accumulation, exact resume after SIGKILL and
SIGTERM, checkpoint fallback, the NaN stop, and clear errors for bad data configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moela.configs import load
from moela.data.pipeline import get_tokenizer, train_stream
from moela.data.sources import open_sources
from moela.model.checkpoint import load_model
from moela.model.transformer import init_model
from moela.training.step import loss_terms, make_train_step

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SRC = Path(json.__file__).parent
TIMING = {"tokens_per_s", "step_time_s", "model_tflops_per_s", "mfu"}
# train.py subprocesses run data-parallel on 2 CPU devices (mesh data=-1 takes them all)
TRAIN_ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_corpus")
    for f in sorted(CORPUS_SRC.glob("*.py")):
        shutil.copy(f, root / f.name.replace(".py", ".txt"))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


def overrides(corpus: Path, data_dir: Path, out: Path, **train) -> list[str]:
    base = {
        "steps": 12,
        "global_batch_size": 4,
        "seq_len": 32,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "keep_checkpoints": 10,
        "warmup_steps": 2,
        "out_dir": str(out),
        **train,
    }
    return [
        f"data.text_glob={corpus}/*.txt",
        f"data.data_dir={data_dir}",
        "model.vocab_size=512",
        "model.moe.bias_update_rate=0.01",
        "model.moe.seq_aux_loss_coef=0.001",
    ] + [f"train.{k}={v}" for k, v in base.items()]


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", "tiny"] + [x for a in args for x in ("--set", a)]


def run_train(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(args), cwd=ROOT, capture_output=True, text=True, timeout=300, env=TRAIN_ENV, **kw)


def final_params(out: Path) -> dict:
    _, model = load_model(out)
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def metric_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def assert_same_run(a: Path, b: Path) -> None:
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bit-identical
    assert metric_lines(a) == metric_lines(b)


@pytest.fixture(scope="module")
def reference_run(corpus, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_train(overrides(corpus, data_dir, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_loss_goes_down_and_the_run_is_readable(reference_run):
    losses = [r["loss"] for r in metric_lines(reference_run) if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.5
    evals = [r["eval_loss"] for r in metric_lines(reference_run) if "eval_loss" in r]
    assert evals[-1] < evals[0]
    for name in ("tokenizer.model", "config.json", "loss.png"):
        assert (reference_run / name).is_file(), name
    assert any((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 5, 8, 11]


def test_a_run_resumes_under_another_runtime(corpus, data_dir, tmp_path, reference_run):
    """What a model is (model.*) is the checkpoint's identity; how it is computed (runtime.*) may
    change: the reference run's step-5 checkpoint resumes with another attention backend and remat
    policy, and steps 6-11 follow the uninterrupted run to float32 rounding."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    for step in (8, 11):
        shutil.rmtree(out / "checkpoints" / str(step))
    done = run_train(overrides(corpus, data_dir, out) + ["runtime.attention=reference", "runtime.remat=full"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "checkpoints/5" in done.stdout
    assert "the run continues under another runtime: runtime.attention: 'auto' -> 'reference'" in done.stdout
    assert "runtime.remat: 'none' -> 'full'" in done.stdout
    losses = {r["step"]: r["loss"] for r in metric_lines(out) if "loss" in r}
    want = {r["step"]: r["loss"] for r in metric_lines(reference_run) if "loss" in r}
    assert sorted(losses) == list(range(12))
    np.testing.assert_allclose([losses[s] for s in range(6, 12)], [want[s] for s in range(6, 12)], rtol=1e-4)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(corpus, data_dir, tmp_path, reference_run):
    """Killed at a random checkpoint while two loader workers per shard read ahead, then restarted:
    the run ends bit-identical to the reference (which streamed without workers)."""
    out = tmp_path / "run"
    args = overrides(corpus, data_dir, out) + ["data.workers=2", "data.prefetch=4"]
    kill_after = int(np.random.default_rng().choice([2, 5, 8]))
    proc = subprocess.Popen(
        train_cmd(args), cwd=ROOT, env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / str(kill_after)).exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "2").exists(), kill_after
    again = run_train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert_same_run(reference_run, out)


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_bit_identical(corpus, data_dir, tmp_path, reference_run):
    out = tmp_path / "run"
    args = overrides(corpus, data_dir, out)
    proc = subprocess.Popen(
        train_cmd(args), cwd=ROOT, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=240)
    if proc.returncode == 143:
        assert "SIGTERM: saved step" in stdout
    else:  # the signal came after the last step: the run simply finished
        assert proc.returncode == 0
    again = run_train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(reference_run, out)


@pytest.mark.slow
def test_two_processes_train_sharded_then_resume_on_another_mesh(corpus, data_dir, tmp_path):
    """Real multi-host: two train.py processes (two CPU devices each, jax.distributed on localhost)
    form a data=4 mesh with FSDP, so every parameter and moment is split across both processes;
    each process streams its own shard of the records (half of every batch) and checkpoints
    sharded. One process with two shards (data.shards=2) sees the same global batches and ends
    with the same losses and parameters. Then one process with a different mesh (2 devices, data
    parallel) resumes the two-process run from its step-5 checkpoint, keeps its 2 shards, and
    ends where the one-process run ends."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, single = tmp_path / "run", tmp_path / "single"
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "MOELA_PROCESS_ID": str(i),
            "MOELA_COORDINATOR": f"127.0.0.1:{port}",
            "MOELA_NUM_PROCESSES": "2",
        }
        args = overrides(corpus, data_dir, out) + ["mesh.strategy=fsdp"]
        procs.append(
            subprocess.Popen(
                train_cmd(args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert "'data': 4" in outputs[0][0] and "(fsdp) over 4 cpu devices in 2 process(es)" in outputs[0][0]
    assert "in 2 shard(s)" in outputs[0][0] and "this one loading batch rows [0, 2)" in outputs[0][0]
    assert "validation loss" in outputs[0][0] and "validation loss" not in outputs[1][0]  # process 0 reports
    done = run_train(overrides(corpus, data_dir, single) + ["data.shards=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    ours, ref = metric_lines(out), metric_lines(single)
    assert [sorted(r) for r in ours] == [sorted(r) for r in ref]
    for a, b in zip(ours, ref):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    pa, pb = final_params(out), final_params(single)
    for name in pb:
        np.testing.assert_allclose(pa[name], pb[name], atol=1e-4, err_msg=name)

    for step in (8, 11):
        shutil.rmtree(out / "checkpoints" / str(step))
    again = run_train(overrides(corpus, data_dir, out))  # one process, 2 devices, data parallel
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "(dp) over 2 cpu devices in 1 process(es)" in again.stdout
    assert "in 2 shard(s)" in again.stdout  # the run's shard count, not this machine's
    pa = final_params(out)
    for name in pb:
        np.testing.assert_allclose(pa[name], pb[name], atol=1e-4, err_msg=name)


def test_corrupt_latest_checkpoint_falls_back(corpus, data_dir, tmp_path, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "checkpoints" / "11")
    for f in (out / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    again = run_train(overrides(corpus, data_dir, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    # one line saying which checkpoint, why, where it went and which one is used; no orbax fragment
    (line,) = [line for line in again.stderr.splitlines() if "checkpoint step 8" in line]
    aside = out / "unreadable_checkpoints"
    (moved,) = aside.iterdir()
    assert f"in {out / 'checkpoints'} is unreadable (its data is damaged" in line, line
    assert f"moved it to {moved}; resuming from step 5" in line, line
    assert_same_run(reference_run, out)


def test_nan_stops_without_a_nan_checkpoint(corpus, data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_train(
        overrides(corpus, data_dir, out, learning_rate=1e12, checkpoint_every=1, grad_clip=0, warmup_steps=0)
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "loss is nan" in done.stderr or "loss is inf" in done.stderr
    if (out / "checkpoints").exists() and any(p.name.isdigit() for p in (out / "checkpoints").iterdir()):
        for name, value in final_params(out).items():
            assert np.isfinite(value).all(), name


@pytest.mark.parametrize(
    "bad, needle",
    [
        (["data.dataset=no_such_dataset_xyz"], "not a known tfds dataset"),
        (["data.text_glob=/nonexistent/folder/*.txt"], "matches no files"),
        (["data.dataset=jsonl:/nonexistent/{split}.jsonl"], "matches no files"),
        (["data.mixture=moela_text:1, jsonl:/nonexistent/{split}.jsonl:1"], "matches no files"),
        (["mesh.data=3"], "needs 3 devices but 2 are present"),
        (["train.microbatches=8"], "must be divisible by the 2 devices the batch is split over x train.microbatches 8"),
    ],
)
def test_bad_data_configs_fail_fast(bad, needle, tmp_path):
    done = run_train([f"train.out_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path}"] + bad)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ in-process numerics


@pytest.fixture(scope="module")
def micro(corpus, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    cfg = load(
        "tiny",
        overrides(corpus, data_dir, out, global_batch_size=8, seq_len=16)
        + ["model.d_model=32", "model.num_layers=2", "model.moe.d_ff=16", "model.d_ff=32"],
    )
    sources = open_sources(cfg.data, "train")
    stream = train_stream(cfg, get_tokenizer(cfg, sources), sources, (0, 8), 1)
    batch = jax.tree.map(jnp.asarray, stream.next())
    stream.close()
    return cfg, batch


def test_gradient_accumulation_equals_one_big_batch(micro):
    cfg, batch = micro
    results = []
    for m in (1, 4):
        c = load("tiny", []).__class__(
            **{**cfg.__dict__, "train": cfg.train.__class__(**{**cfg.train.__dict__, "microbatches": m})}
        )
        graphdef, params, rest = nnx.split(init_model(c.model, seed=1), nnx.Param, ...)
        tx = optax.sgd(1.0)  # the update is minus the gradient
        step = make_train_step(graphdef, c, tx)
        new_params, _, _, metrics = step(jax.tree.map(jnp.copy, params), rest, tx.init(params), batch)
        grads = jax.tree.map(lambda a, b: a - b, params, new_params)
        results.append((grads, metrics))
    (g1, m1), (g4, m4) = results
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_array_equal(m1["expert_load"], m4["expert_load"])


@pytest.mark.parametrize("tied", [pytest.param(False, marks=pytest.mark.slow), True])
def test_train_step_gradient_equals_autodiff_of_the_logits_loss(micro, tied):
    """The chunked head loss (gradient formed in the forward pass) against plain autodiff."""
    cfg, batch = micro
    cfg = load(
        "tiny",
        [
            f"{k}={v}"
            for k, v in {
                "model.vocab_size": 512,
                "model.d_model": 32,
                "model.num_layers": 2,
                "model.moe.d_ff": 16,
                "model.d_ff": 32,
                "model.tie_embeddings": str(tied).lower(),
                "train.global_batch_size": 8,
                "train.seq_len": 16,
                "train.z_loss": 1e-3,
                "train.loss_chunk_tokens": 32,
            }.items()
        ],
    )
    graphdef, params, rest = nnx.split(init_model(cfg.model, seed=3), nnx.Param, ...)
    tx = optax.sgd(1.0)
    new_params, _, _, metrics = make_train_step(graphdef, cfg, tx)(
        jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, rest), tx.init(params), batch
    )
    grads = jax.tree.map(lambda a, b: a - b, params, new_params)
    tokens = jnp.sum(batch["loss_mask"])

    def plain(p):
        ce, z, aux = loss_terms(graphdef, p, rest, batch)
        return (ce + 1e-3 * z) / tokens + aux["aux_loss"], ce / tokens

    (_, ce), expected = jax.value_and_grad(plain, has_aux=True)(params)
    np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads), jax.tree.leaves(expected)
    ):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


def test_gradients_match_finite_differences(micro):
    cfg, batch = micro
    graphdef, params, rest = nnx.split(init_model(cfg.model, seed=2), nnx.Param, ...)

    def loss(p):
        ce, _, _ = loss_terms(graphdef, p, rest, batch)
        return ce / jnp.sum(batch["loss_mask"])

    grads = jax.jit(jax.grad(loss))(params)
    rng = np.random.default_rng(0)

    def unit(tree):
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))
        return jax.tree.map(lambda x: x / norm, tree)

    # half along the gradient (a derivative well above float32 noise), half a random direction
    noise = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    direction = unit(jax.tree.map(jnp.add, unit(grads), unit(noise)))
    h = 1e-2
    f = jax.jit(lambda s: loss(jax.tree.map(lambda p, d: p + s * d, params, direction)))
    numeric = (float(f(h)) - float(f(-h))) / (2 * h)
    analytic = float(sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2)


@pytest.mark.parametrize(
    "extra",
    [
        ["model.moe.num_experts=0"],
        ["model.attention.kind=gqa", "model.attention.num_kv_heads=2", "model.tie_embeddings=true"],
    ],
)
def test_train_step_runs_for_dense_and_gqa_models(micro, extra):
    _, batch = micro
    cfg = load(
        "tiny", extra + ["model.vocab_size=512", "model.d_model=32", "train.global_batch_size=8", "train.seq_len=16"]
    )
    graphdef, params, rest = nnx.split(init_model(cfg.model), nnx.Param, ...)
    tx = optax.adamw(1e-2)
    step = make_train_step(graphdef, cfg, tx)
    losses = []
    state = (params, rest, tx.init(params))
    for _ in range(5):
        p, r, o, m = step(*state, batch)
        state = (p, r, o)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_checkpointer_keeps_the_last_k_and_the_best(tmp_path):
    from moela.configs.schema import TrainConfig
    from moela.training.checkpoints import Checkpointer

    state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    ckpt = Checkpointer(tmp_path, TrainConfig(keep_checkpoints=2, keep_best=True, async_checkpoints=False))
    for step, loss in enumerate([5.0, 1.0, 3.0, 4.0, 6.0, 7.0]):
        ckpt.save(step, state, {"m": jnp.zeros(3)}, {"step": step, "eval_loss": loss})
    ckpt.close()
    assert sorted(ckpt.mngr.all_steps()) == [1, 4, 5]
    again = Checkpointer(tmp_path, TrainConfig(keep_checkpoints=2, keep_best=True))
    step, _, opt, meta = again.restore_latest(state, {"m": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 5 and meta["eval_loss"] == 7.0 and again.eval_losses[1] == 1.0
    again.close()


def test_a_run_keeps_its_data_shard_count_across_host_counts():
    from moela.configs import ConfigError
    from moela.training.loop import _data_shards

    assert _data_shards(load("tiny"), (0, 4), None) == 2  # a process holding half the rows: 2 shards
    assert _data_shards(load("tiny", ["data.shards=4"]), (0, 8), None) == 4
    assert _data_shards(load("tiny"), (0, 8), {"shards": 2}) == 2  # the checkpoint's count wins
    with pytest.raises(ConfigError, match=r"data.shards=4, but this run's checkpoints stream 2 shards"):
        _data_shards(load("tiny", ["data.shards=4"]), (0, 8), {"shards": 2})


def test_a_mixture_trains_and_counts_tokens_per_source(corpus, data_dir, tmp_path):
    texts = tmp_path / "jsonl"
    texts.mkdir()
    for split, n in (("train", 60), ("validation", 6)):
        lines = [json.dumps({"text": f"{split} document {i}: " + "lorem ipsum dolor " * (i % 7 + 1)}) for i in range(n)]
        (texts / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    mixture = f"data.mixture=moela_text:0.5, jsonl:{texts}/{{split}}.jsonl:0.5"
    done = run_train(overrides(corpus, data_dir, out, steps=4, checkpoint_every=4) + [mixture])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streaming moela_text" in done.stdout and f"jsonl:{texts}/train.jsonl 60 train records" in done.stdout
    records = [r for r in metric_lines(out) if "loss" in r]
    names = ("tokens.moela_text", f"tokens.jsonl:{texts}/train.jsonl")
    for r in records:  # every packed position has a real target, counted to the source it came from
        assert sum(r[k] for k in names) == (r["step"] + 1) * 4 * 32, r
    assert all(records[-1][k] > 0 for k in names), records[-1]


def test_a_data_state_the_streams_cannot_continue_from_is_named_and_dropped():
    from moela.data.stream import STATE_VERSION
    from moela.training.loop import _resumable_data

    said = []

    def log(*args, **kwargs):
        said.append(" ".join(args))

    good = {"version": STATE_VERSION, "sources": ["moela_text"], "shards": 1}
    assert _resumable_data(good, 5, ["moela_text"], log) is good and not said
    assert _resumable_data(None, 5, ["moela_text"], log) is None
    assert _resumable_data({**good, "version": STATE_VERSION + 1}, 5, ["moela_text"], log) is None
    assert _resumable_data(good, 5, ["moela_text", "lm1b"], log) is None
    assert ["written before streaming" in said[0], "of format" in said[1], "streamed other sources" in said[2]] == [
        True
    ] * 3
    assert all(line.startswith("warning: checkpoint 5 ") for line in said)
