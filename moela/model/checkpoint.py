"""moela checkpoint directories (orbax), written by ``model.hf_import`` and ``train.py``.

    DIR/config.json                 the full moela Config (``configs.save_json``)
    DIR/checkpoints/<step>/params   the model state (parameters and router biases), orbax
    DIR/checkpoints/<step>/...      further items a trainer adds (optimizer state, metadata)

Readers take the latest step unless told otherwise and restore only the items they need,
onto any sharding (``abstract_model`` gives the target shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moela.configs import Config, ConfigError, load_json, save_json
from moela.model.runtime import ONE_DEVICE, Partitioner
from moela.model.transformer import Decoder, abstract_model

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
PARAMS = "params"


class CheckpointError(ValueError):
    pass


def manager(directory: str | Path, **options: Any) -> ocp.CheckpointManager:
    path = Path(directory).absolute() / CHECKPOINTS
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(**options))


def save_params(directory: str | Path, cfg: Config, params: Any, step: int = 0) -> Path:
    """Write ``config.json`` and the model state (an nnx.State or a pure nested dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_json(cfg, directory / CONFIG_FILE)
    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    mngr = manager(directory)
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(tree)}), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return directory


def load_config(directory: str | Path) -> Config:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"'{directory}' is not a moela checkpoint directory: {CONFIG_FILE} is missing "
            "(write one with `python -m moela.model.hf_import` or train.py)"
        )
    try:
        return load_json(path)
    except ConfigError as e:
        raise CheckpointError(f"'{path}' holds an invalid config: {e}") from None


def load_model(
    directory: str | Path, step: int | None = None, partitioner: Partitioner = ONE_DEVICE
) -> tuple[Config, Decoder]:
    """Restore (config, model) from the latest (or the given) step, without a random init.

    Under a mesh's partitioner (``moela.parallel.layout.Layout``) every variable is read straight
    into its shards on that mesh (whatever mesh saved it); otherwise onto this process's first
    device."""
    cfg = load_config(directory)
    graphdef, abstract_state = nnx.split(abstract_model(cfg.model))
    target = nnx.to_pure_dict(abstract_state)
    shardings = partitioner.shardings(abstract_state)
    if shardings is not None:
        shardings = nnx.to_pure_dict(shardings)
    else:  # onto this process's first device, whatever topology saved it
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    mngr = manager(directory)
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint steps under '{Path(directory) / CHECKPOINTS}'")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"step {step} not in '{directory}'; available: {sorted(steps)}")
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    except Exception as e:  # orbax raises many types for truncated or mismatched data
        raise CheckpointError(f"cannot restore step {step} of '{directory}': {type(e).__name__}: {e}") from None
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(abstract_state, restored[PARAMS])
    return cfg, nnx.merge(graphdef, abstract_state)
