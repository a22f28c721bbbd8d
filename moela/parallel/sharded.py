"""Model, optimizer state and batches placed on a mesh by a strategy, born sharded.

Parameters are created inside one ``jax.jit`` whose ``out_shardings`` come from the
variables' logical names, so every device computes and keeps only its own shards: no host
ever holds a full copy of a model that does not fit on it. The optimizer state is created
the same way, each moment sharded like the parameter it mirrors.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moela.configs.schema import ModelConfig
from moela.model.transformer import Decoder
from moela.parallel.layout import Layout, state_shardings


def model_shardings(cfg: ModelConfig, layout: Layout):
    """(graphdef, abstract state, shardings) of the whole model state (params and the rest)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return graphdef, abstract, state_shardings(abstract, layout)


def init_model(cfg: ModelConfig, layout: Layout, seed: int = 0) -> Decoder:
    """A random model whose variables are created directly in their shards.

    Same values as ``model.transformer.init_model(cfg, seed)`` on one device (the random
    streams do not depend on the layout)."""
    graphdef, _, shardings = model_shardings(cfg, layout)
    state = jax.jit(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed))), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def place(state: nnx.State, layout: Layout) -> nnx.State:
    """An existing (e.g. restored or imported) state moved onto the layout."""
    return jax.device_put(state, state_shardings(state, layout))


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, layout: Layout):
    """Shardings of ``tx.init(params)``: moments like their parameters, scalars replicated."""
    abstract = jax.eval_shape(tx.init, params)
    repl = NamedSharding(layout.mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract, param_shardings, transform_non_params=lambda _: repl
    )


def init_optimizer(tx: optax.GradientTransformation, params: Any, param_shardings: Any, layout: Layout):
    return jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, param_shardings, layout))(params)


def shardings_of(tree: Any) -> Any:
    """The shardings of a tree of placed arrays, same structure."""
    return jax.tree.map(lambda x: x.sharding, tree)


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, layout: Layout, seed: int = 0):
    """(graphdef, params, rest, opt_state, (params, rest, opt_state) shardings), all born sharded:
    what ``training.step.make_train_step`` takes."""
    graphdef, params, rest = nnx.split(init_model(cfg, layout, seed), nnx.Param, ...)
    opt_state = init_optimizer(tx, params, shardings_of(params), layout)
    return graphdef, params, rest, opt_state, shardings_of((params, rest, opt_state))


def batch_sharding(layout: Layout) -> NamedSharding:
    """[B, T] token arrays: rows over the batch axis, positions over the length axis."""
    return layout.sharding(("batch", "length"))
