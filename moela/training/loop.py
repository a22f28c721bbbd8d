"""The training loop: data, model, optimiser, checkpoints, evaluation, metrics, preemption.

``run(cfg)`` trains from scratch, or resumes from the newest readable checkpoint in
``train.out_dir`` with no flag, and returns a summary dict. SIGTERM saves a checkpoint and
stops (exit code 143 from train.py); a non-finite loss stops the run before anything of
that step is saved.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from moela.configs import Config, ConfigError, load_json, save_json
from moela.data.pipeline import (
    default_shards,
    get_tokenizer,
    process_span,
    to_global,
    train_stream,
    unigram_entropy,
    validation,
)
from moela.data.sources import open_sources
from moela.data.stream import STATE_VERSION, gather_state
from moela.model.flops import CONVENTION, training_flops_per_token
from moela.model.layers import dtype
from moela.model.runtime import Runtime
from moela.parallel import sharded
from moela.parallel.layout import Layout, state_bytes
from moela.parallel.mesh import MeshError, build_mesh
from moela.parallel.rules import ShardingRuleError
from moela.training.checkpoints import Checkpointer, abstract_like
from moela.training.metrics import MetricsLog, peak_flops
from moela.training.optim import learning_rate, optimizer
from moela.training.step import make_eval_step, make_train_step

PREEMPTED = 143  # 128 + SIGTERM


class NonFiniteLoss(RuntimeError):
    pass


def _check_run_dir(run_dir: Path, cfg: Config, log) -> None:
    """A run directory belongs to one model (``model.*``): refuse to resume a different one into it.
    How it is computed (``runtime.*``) may change from one start to the next."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    try:
        previous = load_json(path, log=log)
    except ConfigError as e:
        raise ConfigError(f"'{path}' is unreadable ({e}); choose another train.out_dir") from None
    if previous.model != cfg.model:
        raise ConfigError(
            f"train.out_dir '{run_dir}' holds a run of a different model; choose another "
            "train.out_dir (or delete the old run)"
        )
    changed = [
        f"runtime.{f.name}: {getattr(previous.runtime, f.name)!r} -> {getattr(cfg.runtime, f.name)!r}"
        for f in dataclasses.fields(cfg.runtime)
        if getattr(previous.runtime, f.name) != getattr(cfg.runtime, f.name)
    ]
    if changed:
        log(f"the run continues under another runtime: {'; '.join(changed)}")


def _evaluate(eval_step, params, rest, batches: list[dict], cfg: Config, sharding) -> dict:
    b = cfg.train.global_batch_size
    ce, tokens = 0.0, 0.0
    for local in batches:
        c, t = eval_step(params, rest, to_global(local, sharding, b))
        ce, tokens = ce + float(c), tokens + float(t)
    loss = ce / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}


def _prepare_data(cfg: Config, primary: bool, span: tuple[int, int]):
    """Training sources, tokenizer, this process's validation batches and the split's token
    counts. With several processes, process 0 builds datasets and the tokenizer first and the
    others then read them (no two processes write the same files)."""

    def both():
        sources = open_sources(cfg.data, "train")
        tok = get_tokenizer(cfg, sources)
        return (sources, tok, *validation(cfg, tok, span))

    if jax.process_count() == 1:
        return both()
    from jax.experimental import multihost_utils

    result = both() if primary else None
    multihost_utils.sync_global_devices("moela: data prepared by process 0")
    return result if primary else both()


def _resumable_data(state: dict | None, step: int, names: list[str], log) -> dict | None:
    """A checkpoint's data state if the streams can continue from it, else None, saying why."""
    if state is None:
        why = "holds no data position (written before streaming)"
    elif state.get("version") != STATE_VERSION:
        why = f"holds a data position of format {state.get('version')}, not {STATE_VERSION}"
    elif state.get("sources") != names:
        why = f"streamed other sources ({state.get('sources')}; now {names})"
    else:
        return state
    log(f"warning: checkpoint {step} {why}; the data streams start again from the beginning", file=sys.stderr)
    return None


def _data_shards(cfg: Config, span: tuple[int, int], saved: dict | None) -> int:
    """The run's shard count: the checkpoint's, else data.shards, else one per process."""
    if saved is None:
        return cfg.data.shards or default_shards(span, cfg.train.global_batch_size)
    if cfg.data.shards and cfg.data.shards != saved["shards"]:
        raise ConfigError(
            f"data.shards={cfg.data.shards}, but this run's checkpoints stream {saved['shards']} shards; "
            f"set data.shards={saved['shards']} (or 0) to resume, or choose another train.out_dir"
        )
    if cfg.train.global_batch_size % saved["shards"]:
        raise ConfigError(
            f"this run streams {saved['shards']} data shards, which do not divide "
            f"train.global_batch_size {cfg.train.global_batch_size}"
        )
    return saved["shards"]


def make_layout(cfg: Config) -> Layout:
    """The mesh and strategy of ``cfg``, with every mistake reported as a ConfigError."""
    t = cfg.train
    try:
        layout = Layout.of(build_mesh(cfg.mesh), cfg.mesh.strategy)
        sharded.model_shardings(cfg.model, layout)  # every parameter's names resolve and divide
    except (MeshError, ShardingRuleError) as e:
        raise ConfigError(f"mesh: {e}") from None
    rows = layout.size("batch")
    if t.global_batch_size % (rows * t.microbatches):
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} must be divisible by the {rows} devices "
            f"the batch is split over x train.microbatches {t.microbatches}"
        )
    ring = layout.size("length")
    if ring > 1 and t.seq_len % (2 * ring):
        raise ConfigError(
            f"train.seq_len {t.seq_len} must be divisible by 2 x mesh.sequence ({2 * ring}) for zig-zag ring attention"
        )
    return layout


def run(cfg: Config, log=print) -> dict:
    t = cfg.train
    run_dir = Path(t.out_dir)
    primary = jax.process_index() == 0
    if not primary:
        log = lambda *args, **kwargs: None  # noqa: E731 -- only process 0 reports
    _check_run_dir(run_dir, cfg, log)
    layout = make_layout(cfg)
    rows_sharding = sharded.batch_sharding(layout)
    saved_tokenizer = run_dir / "tokenizer.model"
    if saved_tokenizer.is_file() and not cfg.data.tokenizer_model:
        # a resumed run keeps the tokenizer it started with, wherever it resumes
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_model=str(saved_tokenizer)))
    span = process_span(rows_sharding, (t.global_batch_size, t.seq_len))
    sources, tok, val_batches, val_counts = _prepare_data(cfg, primary, span)
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not saved_tokenizer.exists():
            shutil.copy(tok.path, saved_tokenizer)
        save_json(cfg, run_dir / "config.json")

    tx = optimizer(t)
    # born sharded: no full copy anywhere
    graphdef, params, rest, opt_state, state_shardings = sharded.init_train_state(cfg.model, tx, layout, t.seed)
    ckpt = Checkpointer(run_dir, t)
    start_step, data_state = 0, None
    restored = ckpt.restore_latest(nnx.merge_state(params, rest), abstract_like(opt_state), log=log)
    if restored is not None:
        step, model_dict, opt_state, meta = restored
        state = nnx.merge_state(params, rest)
        nnx.replace_by_pure_dict(state, model_dict)
        _, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
        start_step = step + 1
        log(f"resumed from {run_dir}/checkpoints/{step}")
        data_state = _resumable_data(meta.get("data"), step, [src.name for src in sources], log)
    metrics_log = MetricsLog(run_dir, start_step - 1 if restored else None, primary)

    shards = _data_shards(cfg, span, data_state)
    stream = train_stream(cfg, tok, sources, span, shards, data_state)
    rt = Runtime(cfg.runtime, layout)
    train_step = make_train_step(graphdef, cfg, tx, layout, state_shardings)
    eval_step = make_eval_step(graphdef, rt)
    lr = learning_rate(t)
    flops = training_flops_per_token(cfg.model, t.seq_len)
    peak, peak_source = peak_flops(t.peak_flops, dtype(cfg.model.compute_dtype))
    entropy = unigram_entropy(val_counts)
    records = ", ".join(f"{src.name} {len(src):,}" for src in sources)
    log(
        f"{cfg.name}: streaming {records} train records in {shards} shard(s) "
        f"({cfg.data.workers} worker(s) each), {t.global_batch_size} rows x {t.seq_len} tokens a step; "
        f"validation {len(val_batches)} batch(es), unigram entropy {entropy:.3f} nats; "
        f"peak {peak / 1e9:.0f} GFLOP/s/device ({peak_source}); "
        f"mesh {dict(layout.mesh.shape)} ({cfg.mesh.strategy}) over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices in {jax.process_count()} process(es), this one loading batch rows "
        f"[{span[0]}, {span[1]}); parameters {state_bytes(params, layout) / 2**20:.1f} MiB per device"
    )

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    history, last_eval, exit_code, eval_step_done = [], {}, 0, None
    bar = tqdm(
        range(start_step, t.steps),
        initial=start_step,
        total=t.steps,
        disable=not primary,
        desc=cfg.name,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
    step = start_step - 1
    try:
        for step in bar:
            batch = to_global(stream.next(), rows_sharding, t.global_batch_size)
            params, rest, opt_state, m = train_step(params, rest, opt_state, batch)
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss} at step {step}; stopping without saving this step "
                    f"(last checkpoint: {max(ckpt.mngr.all_steps(), default=None)}). "
                    "Lower train.learning_rate or check the data."
                )
            window_tokens += float(m["tokens"])
            window_steps += 1
            last = step == t.steps - 1
            if step % t.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                load = np.asarray(m["expert_load"])
                record = {
                    "step": step,
                    "loss": round(loss, 6),
                    "lr": float(lr(step)),
                    "grad_norm": round(float(m["grad_norm"]), 6),
                    "tokens_per_s": round(tps, 1),
                    "step_time_s": round(elapsed / window_steps, 4),
                    "model_tflops_per_s": round(flops["total"] * tps / 1e12, 4),
                    "mfu": round(flops["total"] * tps / (peak * jax.device_count()), 4),
                }
                if len(sources) > 1:
                    seen = np.sum([s["tokens"] for s in gather_state(stream.state(), len(sources))["streams"]], 0)
                    record.update({f"tokens.{src.name}": int(n) for src, n in zip(sources, seen)})
                for k, value in enumerate(np.asarray(m["mtp_loss"]), start=1):
                    record[f"mtp_loss_{k}"] = round(float(value), 6)
                if cfg.model.num_moe_layers:
                    record["expert_load_max_over_mean"] = round(float((load.max(-1) / load.mean(-1)).max()), 4)
                    record["aux_loss"] = round(float(m["aux_loss"]), 6)
                    record["moe_dropped_pairs"] = int(m["moe_dropped_pairs"])
                history.append((step, loss))
                metrics_log.write(record)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
            preempted = stop["signal"] is not None
            save = (step + 1) % t.checkpoint_every == 0 or last or preempted
            if step % t.eval_every == 0 or last or (save and t.keep_best):
                last_eval = _evaluate(eval_step, params, rest, val_batches, cfg, rows_sharding)
                eval_step_done = step
                metrics_log.write({"step": step, **{k: round(v, 6) for k, v in last_eval.items()}})
            if save:
                fresh = last_eval.get("eval_loss") if eval_step_done == step else None
                meta = {"step": step, "eval_loss": fresh, "data": gather_state(stream.state(), len(sources))}
                ckpt.save(step, nnx.merge_state(params, rest), opt_state, meta)
            if preempted:
                ckpt.wait()
                log(f"SIGTERM: saved step {step} to {run_dir}; restart the same command to resume")
                exit_code = PREEMPTED
                break
    finally:
        bar.close()
        stream.close()
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        metrics_log.close()
    return {
        "run_dir": str(run_dir),
        "start_step": start_step,
        "last_step": step,
        "exit_code": exit_code,
        "history": history,
        "unigram_entropy": entropy,
        **last_eval,
        "flops_per_token": flops["total"],
        "flops_convention": CONVENTION,
    }
