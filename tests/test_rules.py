"""Every logical axis of every model variant resolves under each strategy; mistakes are errors."""

from __future__ import annotations

import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from moela.configs import load
from moela.model.transformer import abstract_model
from moela.parallel.rules import DP_TP, STRATEGIES, ShardingRuleError, logical_to_spec


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.attention.kind=gqa", "model.attention.num_kv_heads=2"],
        ["model.attention.q_lora_rank=16", "model.tie_embeddings=true"],
    ],
)
def test_all_model_axes_resolve(strategy, overrides):
    model = abstract_model(load("tiny", overrides).model)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        spec = logical_to_spec(var.get_metadata()["out_sharding"], STRATEGIES[strategy])
        assert len(spec) == len(var.shape), path


def test_strategies_use_the_mesh_axes_they_claim():
    used = {name: {a for _, a in rules if a} for name, rules in STRATEGIES.items()}
    assert used["dp"] == {"data"} and used["fsdp"] == {"data"}
    assert used["tp"] == used["ep_tp"] == {"data", "tensor"}
    assert used["dp_tp_sp"] == used["fsdp_tp_sp"] == {"data", "tensor", "sequence"}
    for rules in STRATEGIES.values():  # no array of the model maps one mesh axis twice
        logical_to_spec(("batch", "length", "act_embed"), rules)
        logical_to_spec(("batch", "length", "act_heads", None), rules)
        logical_to_spec(("expert", "embed", "mlp"), rules)
        logical_to_spec(("layers", "kv_lora", "heads", "qk"), rules)


def test_specs_and_errors():
    assert logical_to_spec(("layers", "embed", "mlp"), DP_TP) == PartitionSpec(None, None, "tensor")
    assert logical_to_spec(("expert", "embed", "mlp"), DP_TP) == PartitionSpec("data", None, "tensor")
    with pytest.raises(ShardingRuleError, match="logical axis 'widgets' has no rule"):
        logical_to_spec(("widgets",), DP_TP)
    with pytest.raises(ShardingRuleError, match="may shard one dim only"):
        logical_to_spec(("heads", "mlp"), DP_TP)
