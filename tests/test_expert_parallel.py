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
from moela.parallel.experts import ExpertAxes, buffer_rows, default_ragged, dispatch_bytes, expert_parallel_swiglu
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
        y_md, _ = nnx.merge(graphdef, state)(x_md, w_mk, ids_mk, rt=rt)
        return jnp.sum(y_md * cot_md), y_md

    @jax.jit
    def step(state, x_md, w_mk, ids_mk, cot_md):
        (_, y_md), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(state, x_md, w_mk, ids_mk, cot_md)
        return y_md, grads

    return step


DISPATCHES = [("blocked", "ring"), ("ragged_dot", "ring"), ("blocked", "gather"), ("blocked", "all_to_all")]
DISPATCH_CASES = [(shape, strategy, impl, d) for shape, strategy in MESHES for impl, d in DISPATCHES]
DISPATCH_CASES.append(((2, 4, 1), "ep_tp", "blocked", "all_to_all"))  # 2 expert devices, F split 4 ways


@pytest.mark.parametrize(
    "shape, strategy, impl, dispatch",
    DISPATCH_CASES,
    ids=["{}x{}x{}-{}-{}-{}".format(*shape, *rest) for shape, *rest in DISPATCH_CASES],
)
def test_routed_experts_match_unsharded(shape, strategy, impl, dispatch):
    """Each compiled step runs all three routings (they are data, not shapes). On CPU
    ``all_to_all`` runs its padded variant, dropless."""
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


def moe_step(graphdef, partitioner, dispatch="auto"):
    runtime = RuntimeConfig(grouped_block_rows=4, expert_dispatch=dispatch)

    def loss(params, rest, x_btd, cot_btd):
        y_btd, stats = nnx.merge(graphdef, params, rest)(x_btd, rt=Runtime(runtime, partitioner))
        return jnp.sum(y_btd * cot_btd) + stats["aux_loss"], (y_btd, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


@pytest.mark.parametrize("dispatch", ["ring", "all_to_all"])
@pytest.mark.parametrize("shape,strategy", MESHES[1:], ids=MESH_IDS[1:])
def test_moe_layer_matches_unsharded(shape, strategy, dispatch):
    """Router, shared experts, load and aux loss around the island: the same values and gradients."""
    graphdef, state = random_module(MoE, MOE_CFG, seed=3)
    graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    rng = np.random.default_rng(4)
    x, cot = (jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(2))
    layout = layout_of(shape, strategy)
    acts = layout.sharding(("batch", "length", "act_embed"))
    (_, (y_ref, stats_ref)), (dp_ref, dx_ref) = moe_step(graphdef, ONE_DEVICE)(params, rest, x, cot)
    placed = [jax.device_put(s, state_shardings(s, layout)) for s in (params, rest)]
    (_, (y, stats)), (dp, dx) = moe_step(graphdef, layout, dispatch)(*placed, *jax.device_put((x, cot), acts))
    assert_close(y, y_ref, "y")
    np.testing.assert_array_equal(np.asarray(stats["load"]), np.asarray(stats_ref["load"]))
    assert_close(stats["aux_loss"], stats_ref["aux_loss"], "aux loss")
    assert int(stats["dropped_pairs"]) == int(stats_ref["dropped_pairs"]) == 0
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


# ----------------------------------------------------------------------------- all_to_all: ragged, capacity


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all``'s contract built from ``all_to_all`` (XLA:CPU has no ragged one),
    every slice padded to the operand's rows: lets CPU run the ragged variant's offsets and sizes."""
    n, rows, tail = jax.lax.axis_size(axis_name), operand.shape[0], operand.shape[1:]
    r = jnp.arange(rows)
    chunks = operand.at[input_offsets[:, None] + r].get(mode="fill", fill_value=0)  # [peer, rows, ...]
    chunks = jnp.where((r < send_sizes[:, None]).reshape((n, rows) + (1,) * len(tail)), chunks, 0)
    received = jax.lax.all_to_all(chunks.reshape((n * rows,) + tail), axis_name, 0, 0, tiled=True)
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each sender's slice lands
    target = jnp.where(r < recv_sizes[:, None], at[:, None] + r, output.shape[0])
    return output.at[target.reshape(-1)].set(received, mode="drop")


def skewed_routing(seed=0):
    """Like ``routing``, with experts 12-15 (the last device's, for 2 or 4 expert devices) six
    times as likely as the others: that device's buffers overflow at capacity 1, the others' not."""
    rng = np.random.default_rng(seed)
    p = np.where(np.arange(E) >= 12, 6.0, 1.0)
    ids = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(M)]).astype(np.int32)
    return jnp.asarray(rng.uniform(0.1, 1.0, (M, K)), jnp.float32), jnp.asarray(ids)


def kept_pairs(ids, n: int, groups: int, capacity: float, ragged: bool) -> np.ndarray:
    """NumPy: which (token, slot) pairs the all_to_all dispatch keeps, [M, K] bool. The M rows lie in
    n·groups equal blocks, expert-axis index major; the n blocks of one group exchange. Each sender's
    pairs go in (token, slot) order per destination; padded keeps the first ``cap`` per destination,
    ragged the rows that land below ``cap`` on the receiver, after those of lower-index senders."""
    rows = M // (n * groups)
    cap = buffer_rows(rows * K, n, capacity, ragged, most=rows * min(K, E // n))
    dest = np.asarray(ids) // (E // n)
    keep = np.zeros(dest.shape, bool)
    for g in range(groups):
        taken = np.zeros(n, int)
        for d in range(n):
            block = slice((d * groups + g) * rows, (d * groups + g + 1) * rows)
            rank, kept = np.zeros(n, int), []
            for j in dest[block].reshape(-1):
                kept.append((taken[j] if ragged else 0) + rank[j] < cap)
                rank[j] += 1
            keep[block] = np.reshape(kept, (rows, K))
            taken += rank
    return keep


def expert_grads(fn):
    """Jitted (y, dropped, grads of sum(y · cot) by x, weights, W_gate, W_up, W_down) of ``fn``."""

    def loss(x, w, ids, wg, wu, wd, cot):
        y, dropped = fn(x, w, ids, wg, wu, wd)
        return jnp.sum(y * cot), (y, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5), has_aux=True))


CAPACITY_MESHES = [((4, 2, 1), "ep_tp"), ((2, 2, 2), "dp_tp_sp")]


@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged_emulated"])
@pytest.mark.parametrize("shape,strategy", CAPACITY_MESHES, ids=["4x2x1-ep_tp", "2x2x2-dp_tp_sp"])
def test_all_to_all_drops_what_overflows_and_counts_it(monkeypatch, shape, strategy, ragged):
    """Dropless at capacity 0; at capacity 1 exactly the pairs a NumPy replay of the buffers says
    overflow are dropped and counted, and values and gradients equal the one-device experts
    without those pairs. The ragged variant runs on an emulated collective (same offsets, sizes)."""
    if ragged:
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    layout = layout_of(shape, strategy)
    assert not default_ragged(layout.mesh)  # CPU devices: padded unless forced
    axes = ExpertAxes(layout.axis("expert"), layout.axis("mlp"), layout.axis("batch"), layout.axis("length"))
    n = layout.size("expert")
    groups = layout.size("batch") * layout.size("length") // n
    rng = np.random.default_rng(7)
    x, cot = (jnp.asarray(rng.standard_normal((M, D)), jnp.float32) for _ in range(2))
    wg, wu = (jnp.asarray(rng.standard_normal((E, D, F)) / 3, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, F, D)) / 3, jnp.float32)
    reference = expert_grads(lambda *a: (routed_swiglu(*a, backend="blocked", block=4), jnp.zeros((), jnp.int32)))
    for capacity in (0.0, 1.0):
        sharded = expert_grads(
            lambda *a, c=capacity: expert_parallel_swiglu(
                *a, mesh=layout.mesh, axes=axes, block=4, dispatch="all_to_all", capacity=c, ragged=ragged
            )
        )
        for kind in ("skewed", "one_device", "idle"):
            w, ids = skewed_routing() if kind == "skewed" else routing(kind)
            keep = kept_pairs(ids, n, groups, capacity, ragged)
            if capacity == 0:
                assert keep.all()
            elif kind != "idle":
                assert 0 < (~keep).sum() < keep.size, kind  # the case is discriminating
            (_, (y, dropped)), grads = sharded(x, w, ids, wg, wu, wd, cot)
            ids_ref = jnp.where(keep, ids, E)  # past every expert: the pair is computed nowhere
            (_, (y_ref, _)), grads_ref = reference(x, w, ids_ref, wg, wu, wd, cot)
            what = f"{kind}, capacity {capacity}"
            assert int(dropped) == (~keep).sum(), what
            assert_close(y, y_ref, f"{what}: y")
            for name, g, g_ref in zip(("x", "weights", "W_gate", "W_up", "W_down"), grads, grads_ref):
                assert_close(g, g_ref, f"{what}: d {name}")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_all_to_all_lowers_for_accelerators(platform):
    """The ragged variant (forced: the mesh's devices are CPUs) exports for TPU and GPU, forward and
    backward, with ``ragged_all_to_all`` collectives in the module: x and ids out, y back; the
    backward adds the transposes of the two row transfers."""
    layout = layout_of((8, 1, 1), "ep_tp")
    axes = ExpertAxes(expert="data", batch="data")

    def forward(x, w, ids, wg, wu, wd):
        return expert_parallel_swiglu(
            x, w, ids, wg, wu, wd, mesh=layout.mesh, axes=axes, dispatch="all_to_all", backend="ragged_dot", ragged=True
        )[0]

    def backward(*args):
        return jax.grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 3, 4, 5))(*args)

    spec = jax.ShapeDtypeStruct
    args = (
        spec((M, D), jnp.bfloat16),
        spec((M, K), jnp.float32),
        spec((M, K), jnp.int32),
        *(spec((E, D, F), jnp.bfloat16) for _ in range(2)),
        spec((E, F, D), jnp.bfloat16),
    )
    # jax lowers ragged_all_to_all to a custom call without export-compatibility guarantees
    # (jax.export refuses it by default, for tpu and cuda alike): this test allows it.
    allow = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    for fn, calls in ((forward, 3), (backward, 5)):
        module = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=allow)(*args).mlir_module()
        assert module.count("stablehlo.custom_call @ragged_all_to_all(") == calls, (fn.__name__, platform)


def test_dispatch_bytes():
    """Bytes a device sends per MoE layer forward, DeepSeek-V3-like (n = 64 devices, k = 8, bf16):
    all_to_all's routed rows are about k/n of ring's, padded dropless buffers k times the rows."""
    kw = dict(rows=1024, k=8, n=64, d_model=7168, itemsize=2)
    row = 7168 * 2
    ring, gather, a2a = (dispatch_bytes(d, **kw) for d in ("ring", "gather", "all_to_all"))
    assert ring == 63 * 1024 * (2 * row + 64) + 1024 * row and gather == 63 * 1024 * (2 * row + 64)
    assert a2a == 8 * 1024 * 63 // 64 * (2 * row + 4) + 63 * 64 * 4
    assert dispatch_bytes("all_to_all", **kw, ragged=False) == 63 * 1024 * 8 * (2 * row + 4)
    assert dispatch_bytes("all_to_all", **kw, ragged=False, capacity=1.0) == 63 * 128 * (2 * row + 4)
    assert dispatch_bytes("all_to_all", **kw, capacity=0.5) == round(4096 * 63 / 64 * (2 * row + 4)) + 63 * 64 * 4
    assert a2a < gather < ring and dispatch_bytes("ring", **{**kw, "n": 1}) == 0


def test_planner_sizes_the_all_to_all_buffers():
    """``planner.memory.expert_island_bytes``: dropless buffers cost more than capacity-1 ones, and
    the ragged variant (no padded send buffer, n x smaller receive buffer at capacity 1) less than
    the padded one."""
    import dataclasses

    from moela.configs import load
    from moela.planner import memory

    cfg = load("tiny", ["runtime.expert_dispatch=all_to_all"])
    layout = memory.abstract_layout({"data": 4, "tensor": 2, "sequence": 1}, "ep_tp")
    local = memory.local_model_config(cfg.model, layout)

    def island(capacity, ragged):
        runtime = dataclasses.replace(cfg.runtime, expert_capacity=capacity)
        return memory.expert_island_bytes(local, runtime, layout, 128, ragged=ragged)

    assert island(0.0, False) == island(0.0, None)  # an abstract mesh planned here: CPU, padded
    for ragged in (False, True):
        assert all(a > b for a, b in zip(island(0.0, ragged), island(1.0, ragged)))
    assert island(0.0, True)[1] < island(0.0, False)[1] and island(1.0, True)[1] < island(1.0, False)[1]
