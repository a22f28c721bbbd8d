"""Expert parallelism (``parallel.experts``) equals the one-device computation.

On 8 fake CPU devices, ``RoutedExperts`` and a whole ``MoE`` layer run under a layout that
splits experts over ``data`` (strategies ``ep_tp`` and ``dp_tp_sp``), jitted, with inputs and
parameters placed by NamedSharding; outputs and gradients (x, routing weights, all expert
weights) must match the same module without a layout. Routings cover the awkward cases:
experts (and whole devices) that receive no token, and every token on one device's experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moela.configs.schema import LayerContext, MeshConfig, MoEConfig
from moela.kernels.grouped import block_layout, routed_swiglu
from moela.model.moe import MoE, RoutedExperts
from moela.parallel.experts import ExpertAxes, expert_parallel_swiglu
from moela.configs.schema import RuntimeConfig
from moela.model.runtime import ONE_DEVICE, Runtime
from moela.parallel.layout import Layout, state_shardings
from moela.parallel.mesh import build_mesh
from moela.parallel.rules import ShardingRuleError

B, T, D, F, E, K = 4, 8, 8, 8, 16, 2
M = B * T
CTX = LayerContext(d_model=D, param_dtype="float32", compute_dtype="float32", init_std=0.3, norm_eps=1e-6)
MESHES = [((8, 1, 1), "ep_tp"), ((4, 2, 1), "ep_tp"), ((2, 2, 2), "dp_tp_sp")]
MESH_IDS = ["8x1x1-ep_tp", "4x2x1-ep_tp", "2x2x2-dp_tp_sp"]


def layout_of(shape, strategy) -> Layout:
    data, tensor, sequence = shape
    return Layout.of(build_mesh(MeshConfig(data=data, tensor=tensor, sequence=sequence, strategy=strategy)), strategy)


def random_module(cls, cfg, seed=0):
    """``cls(cfg, CTX)`` with N(0, 0.3) parameters, built abstractly (no per-shape init compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, CTX, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype), state)


def routing(kind: str, seed=0):
    """(weights [M, K] f32, ids [M, K] int32): distinct experts per token.

    ``random``: any experts. ``idle``: only experts {1, 2, 9}, so most experts (and under
    8- or 4-way expert parallelism whole devices) get no token. ``one_device``: only experts
    14 and 15, which the last device holds whether experts are split 2, 4 or 8 ways.
    """
    rng = np.random.default_rng(seed)
    pool = {"random": np.arange(E), "idle": np.array([1, 2, 9]), "one_device": np.array([14, 15])}[kind]
    ids = np.stack([rng.permutation(pool)[:K] for _ in range(M)]).astype(np.int32)
    return jnp.asarray(rng.uniform(0.1, 1.0, (M, K)), jnp.float32), jnp.asarray(ids)


ROUTINGS = ["random", "idle", "one_device"]


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()), err_msg=what)


# ----------------------------------------------------------------------------- RoutedExperts


def experts_step(graphdef, rt):
    """Jitted (y, (d state, dx, d weights)) of sum(RoutedExperts(x, w, ids) · cot), under ``rt``."""

    def loss(state, x_md, w_mk, ids_mk, cot_md):
        y_md = nnx.merge(graphdef, state)(x_md, w_mk, ids_mk, rt=rt)
        return jnp.sum(y_md * cot_md), y_md

    @jax.jit
    def step(state, x_md, w_mk, ids_mk, cot_md):
        (_, y_md), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(state, x_md, w_mk, ids_mk, cot_md)
        return y_md, grads

    return step


@pytest.mark.parametrize("impl, dispatch", [("blocked", "ring"), ("ragged_dot", "ring"), ("blocked", "gather")])
@pytest.mark.parametrize("shape,strategy", MESHES, ids=MESH_IDS)
def test_routed_experts_match_unsharded(shape, strategy, impl, dispatch):
    """Each compiled step runs all three routings (they are data, not shapes)."""
    cfg = MoEConfig(num_experts=E, experts_per_token=K, d_ff=F)
    runtime = RuntimeConfig(grouped_matmul=impl, grouped_block_rows=4, expert_dispatch=dispatch)
    graphdef, state = random_module(RoutedExperts, cfg)
    rng = np.random.default_rng(1)
    x, cot = (jnp.asarray(rng.standard_normal((M, D)), jnp.float32) for _ in range(2))
    layout = layout_of(shape, strategy)
    tokens = NamedSharding(
        layout.mesh, PartitionSpec(tuple(a for a in (layout.axis("batch"), layout.axis("length")) if a))
    )
    placed_state = jax.device_put(state, state_shardings(state, layout))
    assert placed_state["w_gate"][...].sharding.spec[0] == "data"
    sharded, reference = experts_step(graphdef, Runtime(runtime, layout)), experts_step(graphdef, Runtime(runtime))
    for kind in ROUTINGS:
        w, ids = routing(kind)
        y_ref, (ds_ref, dx_ref, dw_ref) = reference(state, x, w, ids, cot)
        y, (ds, dx, dw) = sharded(placed_state, *jax.device_put((x, w, ids, cot), tokens))
        assert y.sharding.is_equivalent_to(tokens, 2), y.sharding
        assert np.abs(np.asarray(y_ref)).max() > 0.1
        assert_close(y, y_ref, f"{kind}: y")
        assert_close(dx, dx_ref, f"{kind}: dx")
        assert_close(dw, dw_ref, f"{kind}: d routing weights")
        for name in ("w_gate", "w_up", "w_down"):
            g, g_ref = np.asarray(ds[name][...]), np.asarray(ds_ref[name][...])
            assert_close(g, g_ref, f"{kind}: d {name}")
            used = np.isin(np.arange(E), np.asarray(ids))
            assert np.all(g_ref[~used] == 0) and np.all(np.abs(g_ref[used]).max(axis=(1, 2)) > 0)


# ----------------------------------------------------------------------------- whole MoE layer


MOE_CFG = MoEConfig(
    num_experts=E,
    experts_per_token=K,
    num_shared_experts=1,
    d_ff=F,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.0,
    seq_aux_loss_coef=0.01,
)
MOE_RUNTIME = RuntimeConfig(grouped_block_rows=4)


def moe_step(graphdef, partitioner):
    def loss(params, rest, x_btd, cot_btd):
        y_btd, stats = nnx.merge(graphdef, params, rest)(x_btd, rt=Runtime(MOE_RUNTIME, partitioner))
        return jnp.sum(y_btd * cot_btd) + stats["aux_loss"], (y_btd, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


@pytest.mark.parametrize("shape,strategy", MESHES[1:], ids=MESH_IDS[1:])
def test_moe_layer_matches_unsharded(shape, strategy):
    """Router, shared experts, load and aux loss around the island: the same values and gradients."""
    graphdef, state = random_module(MoE, MOE_CFG, seed=3)
    graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    rng = np.random.default_rng(4)
    x, cot = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(2))
    layout = layout_of(shape, strategy)
    acts = layout.sharding(("batch", "length", "act_embed"))
    (_, (y_ref, stats_ref)), (dp_ref, dx_ref) = moe_step(graphdef, ONE_DEVICE)(params, rest, x, cot)
    placed = [jax.device_put(s, state_shardings(s, layout)) for s in (params, rest)]
    (_, (y, stats)), (dp, dx) = moe_step(graphdef, layout)(*placed, *jax.device_put((x, cot), acts))
    assert_close(y, y_ref, "y")
    np.testing.assert_array_equal(np.asarray(stats["load"]), np.asarray(stats_ref["load"]))
    assert_close(stats["aux_loss"], stats_ref["aux_loss"], "aux loss")
    assert_close(dx, dx_ref, "dx")
    flat, flat_ref = dict(nnx.to_flat_state(dp)), dict(nnx.to_flat_state(dp_ref))
    assert flat.keys() == flat_ref.keys() and len(flat) == 7
    for key in flat:
        assert_close(flat[key][...], flat_ref[key][...], "d " + ".".join(map(str, key)))


def test_island_only_where_experts_are_split():
    """Layouts that split experts trace the shard_map island; ``tp`` and ``fsdp_tp_sp`` (experts
    unsplit) the local path."""
    graphdef, state = random_module(RoutedExperts, MoEConfig(num_experts=E, experts_per_token=K, d_ff=F))
    w, ids = routing("random")
    x = jnp.zeros((M, D), jnp.float32)

    def jaxpr(strategy):
        layout = layout_of((4, 2, 1) if strategy in ("ep_tp", "tp") else (2, 2, 2), strategy)
        rt = Runtime(partitioner=layout)
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x, w, ids, rt=rt))(state))

    assert "shard_map" in jaxpr("ep_tp") and "shard_map" in jaxpr("dp_tp_sp")
    assert "shard_map" not in jaxpr("tp") and "shard_map" not in jaxpr("fsdp_tp_sp")


# ----------------------------------------------------------------------------- local pieces


def test_rows_outside_the_groups_get_no_block():
    """Rows past sum(group_sizes) go nowhere: dest is out of bounds, and no block is spent on them."""
    gs = jnp.asarray([5, 0, 2], jnp.int32)
    dest, block_expert, nb = block_layout(gs, 20, 4)
    assert nb == 5 + 3
    np.testing.assert_array_equal(dest[:7], [0, 1, 2, 3, 4, 8, 9])
    assert np.all(np.asarray(dest[7:]) == nb * 4)
    np.testing.assert_array_equal(block_expert[:3], [0, 0, 2])


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_expert_slices_sum_to_the_whole(impl):
    """``routed_swiglu`` over experts [first, first + E/4) for the four slices adds up to all E
    experts at once; each slice is zero on tokens routed only elsewhere."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((E, D, F)) / 3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, F, D)) / 3, jnp.float32)
    w, ids = routing("random", seed=6)
    run = jax.jit(lambda first, *ws: routed_swiglu(x, w, ids, *ws, backend=impl, block=4, first_expert=first))
    whole = run(0, wg, wu, wd)
    q = E // 4
    parts = [run(i * q, wg[i * q : (i + 1) * q], wu[i * q : (i + 1) * q], wd[i * q : (i + 1) * q]) for i in range(4)]
    assert_close(sum(parts), whole, "sum of slices")
    elsewhere = np.all(np.asarray(ids) >= q, axis=1)
    assert elsewhere.any() and np.all(np.asarray(parts[0])[elsewhere] == 0)


def test_indivisible_experts_are_rejected():
    layout = layout_of((8, 1, 1), "ep_tp")
    x, w = jnp.zeros((M, D)), jnp.zeros((M, K))
    wg, wd = jnp.zeros((12, D, F)), jnp.zeros((12, F, D))
    with pytest.raises(ShardingRuleError, match="12 is not divisible by 8"):
        expert_parallel_swiglu(
            x, w, w.astype(jnp.int32), wg, wg, wd, mesh=layout.mesh, axes=ExpertAxes(expert="data", batch="data")
        )
