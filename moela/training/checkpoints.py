"""Training checkpoints with orbax: async saves, keep-last-K (+ the best by eval loss), and
restore that falls back to an earlier step when the latest cannot be read.

Layout (shared with ``model.checkpoint``, so ``model.logits`` reads a run directly):
``RUN/checkpoints/<step>/{params, opt_state, meta}``; ``params`` is the whole model state
(parameters and router biases), ``meta`` a JSON dict (step, eval loss).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moela.configs.schema import TrainConfig
from moela.model.checkpoint import CHECKPOINTS, PARAMS, CheckpointError


OPT_STATE, META = "opt_state", "meta"  # a training checkpoint's parts beside PARAMS


def damage(step_dir: Path, error: Exception) -> str:
    """What is wrong with a checkpoint step that orbax could not restore, in a few words: a part
    missing, files empty (a write cut short), or else the kind of error orbax raised."""
    if not step_dir.is_dir():
        return "its folder is missing"
    missing = [part for part in (PARAMS, OPT_STATE, META) if not (step_dir / part).exists()]
    if missing:
        return f"its {', '.join(missing)} part{'s are' if len(missing) > 1 else ' is'} missing"
    empty = sorted(str(f.relative_to(step_dir)) for f in step_dir.rglob("*") if f.is_file() and f.stat().st_size == 0)
    if empty:
        more = f" and {len(empty) - 2} more" if len(empty) > 2 else ""
        return f"empty file{'s' if len(empty) > 1 else ''} {', '.join(empty[:2])}{more}: a write was cut short"
    return f"its data is damaged: orbax raised {type(error).__name__}"


class Checkpointer:
    def __init__(self, run_dir: str | Path, t: TrainConfig):
        self.keep, self.keep_best = t.keep_checkpoints, t.keep_best
        self.mngr = ocp.CheckpointManager(
            Path(run_dir).absolute() / CHECKPOINTS,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=t.async_checkpoints),
        )
        self.eval_losses: dict[int, float] = {}

    def save(self, step: int, model_state, opt_state, meta: dict) -> None:
        """Start saving (async); prune to the last K steps plus, optionally, the best eval loss."""
        if meta.get("eval_loss") is not None:
            self.eval_losses[step] = meta["eval_loss"]
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
                    OPT_STATE: ocp.args.StandardSave(opt_state),
                    META: ocp.args.JsonSave({**meta, "eval_losses": {str(k): v for k, v in self.eval_losses.items()}}),
                }
            ),
            force=True,
        )
        steps = sorted(self.mngr.all_steps())
        keep = set(steps[-self.keep :])
        if self.keep_best and self.eval_losses:
            keep.add(min(self.eval_losses, key=self.eval_losses.get))
        for old in steps:
            if old not in keep and old != step:
                self.mngr.delete(old)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def restore_latest(self, abstract_model_state, abstract_opt_state, log=print):
        """(step, model pure dict, opt_state, meta) of the newest readable step, or None if none exist.

        An unreadable step (truncated, missing files) is reported and the one before it tried.
        """
        steps = sorted(self.mngr.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                restored = self.mngr.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            PARAMS: ocp.args.StandardRestore(nnx.to_pure_dict(abstract_model_state)),
                            OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
                            META: ocp.args.JsonRestore(),
                        }
                    ),
                )
            except Exception as e:  # orbax/tensorstore raise many types for damaged data
                unreadable.append((step, damage(Path(self.mngr.directory) / str(step), e)))
                continue
            self._set_aside(unreadable, step, log)
            for key, value in restored[META].get("eval_losses", {}).items():
                self.eval_losses[int(key)] = value
            return step, restored[PARAMS], restored[OPT_STATE], restored[META]
        if steps:
            why = "; ".join(f"step {step}: {reason}" for step, reason in unreadable)
            raise CheckpointError(
                f"none of the checkpoints {steps} under '{self.mngr.directory}' can be restored ({why}); "
                "move the directory away to start afresh"
            )
        return None

    def _set_aside(self, unreadable: list[tuple[int, str]], used: int, log) -> None:
        """Move unreadable steps to RUN/unreadable_checkpoints/ (kept for inspection, out of the way),
        one line each: which step, why, where it went, and which step the run resumes from."""
        if not unreadable:
            return
        if jax.process_count() > 1:  # process 0 moves them; everyone waits, then sees the same steps
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                self._move_aside(unreadable, used, log)
            multihost_utils.sync_global_devices("moela: unreadable checkpoints set aside")
            self.mngr.reload()
            return
        self._move_aside(unreadable, used, log)
        self.mngr.reload()

    def _move_aside(self, unreadable: list[tuple[int, str]], used: int, log) -> None:
        directory = Path(self.mngr.directory)
        aside = directory.parent / "unreadable_checkpoints"
        aside.mkdir(exist_ok=True)
        for step, reason in unreadable:
            target = aside / f"{step}-{int(time.time())}"
            shutil.move(str(directory / str(step)), str(target))
            log(
                f"warning: checkpoint step {step} in {directory} is unreadable ({reason}); moved it to {target}; "
                f"resuming from step {used}",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def abstract_like(tree):
    """Shapes, dtypes and shardings of ``tree``: a restore target that lands where ``tree`` lives."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
