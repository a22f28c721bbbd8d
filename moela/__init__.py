"""moela: a JAX/TPU-first research codebase for DeepSeek-style language models.

The package is stacked in layers; a module imports only from the layers below it
(``tests/test_layers.py`` checks every import against this table)::

    6  cli, scaling, planner      entry points and experiment tooling
    5  training, inference        the trainer; the serving engine
    4  data                       sources, tokenizer, packing, batches
    3  parallel                   mesh, sharding rules, shard_map islands, multi-host start-up
    2  model                      the network, its parameters, FLOPs, checkpoints, HF import
    1  kernels                    pure array ops with backends chosen by name
    0  configs                    typed schema, loading, validation, presets
       compat                     what differs between JAX releases (below every layer)
"""

__version__ = "0.2.0"
