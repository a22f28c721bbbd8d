"""Per-device memory plan of a config on a mesh, computed abstractly (nothing is allocated).

    python -m moela.planner --config deepseek_v3 --mesh data=64,tensor=8,sequence=4 \\
        --batch 256 --seq 4096 [--strategy fsdp_tp_sp] [--chip v5p] [--serve-batch N --serve-len L] [--set k=v]

Prints bytes per device (GiB = 2**30) for each part, the training and serving totals, which chips
(nominal HBM) they fit, and last one JSON line with every number in bytes and the assumptions.
The mesh is a ``jax.sharding.AbstractMesh`` (names and sizes only): a 2048-device plan runs here.

* parameters: every model variable under the strategy's sharding (``parallel.layout.sharding_report``;
  a dim a mesh axis does not divide is an error). gradients: per ``nnx.Param``, same layout and
  dtype; with ``train.microbatches`` > 1 a second copy accumulates. optimizer:
  ``jax.eval_shape(optimizer(cfg.train).init, params)``, moments sharded like the parameter they
  mirror (``optax.tree_map_params``), scalars replicated.
* fsdp gather: a strategy that shards D over ``data`` all-gathers each layer's weights as it runs:
  the largest layer's gathered weights plus its not yet reduce-scattered gradient.
* kv cache (serving): MLA keeps kv_lora_rank + qk_rope_head_dim values per token and layer, GQA
  2·kv_heads·head_dim, in ``serve.cache_dtype``; rows split over ``data`` (a device holds whole
  rows), the latent and the heads not split.

Activations. One device runs a *local* problem: batch/(data·microbatches) rows of seq/sequence
tokens through a local model config whose tensor-split dims (heads, kv heads, d_ff, expert d_ff,
vocab: whatever the strategy maps onto a mesh axis) are divided by the axis size; D is gathered
for compute, so it stays whole. ``jax.grad`` of ``training.step.training_objective`` on it (the
scanned blocks under ``runtime.remat``; the chunked loss with the global chunk count) is traced with
``jax.make_jaxpr`` and replayed by a liveness simulation (``peak_bytes``): in program order a value
is allocated when produced and freed after its last use; elementwise ops and in-place updates
reuse a dying operand's buffer, reshapes alias, broadcasts and iotas fuse into their consumers,
and a loop or call adds its body's own peak to what is live around it. Inputs and the gradient
outputs are not counted. The peak holds what autodiff keeps for the backward (the forward scans'
stacked residuals, each layer's carry included: ``saved_per_layer``), the largest layer's backward
working set (under remat with its recomputed forward) and the loss chunk's float32 logits and dW
accumulator, each overlapping as the program has them. Experts split over a mesh axis keep all E
in the local config; what the expert-parallel island adds (it all-gathers the tokens of the
expert axis) is traced on its own (``expert_island_bytes``).

``tests/test_plan.py`` compiles ``jax.grad`` of the same objective on one CPU device and checks
the estimate against ``memory_analysis().temp_size_in_bytes``. Program order is the model of the
schedule; XLA's CPU scheduler sometimes runs independent work side by side instead (the unrolled
query blocks of ``kernels.xla`` at seq > 128, a one-layer scan it inlined beside the next scan's
backward), where it allocates more than the plan says. Leave headroom below the chip's HBM.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.extend import core as jcore
from jax.sharding import AbstractMesh

from moela.compat import scan_num_carry
from moela.configs.schema import Config, MeshConfig, ModelConfig, RuntimeConfig
from moela.kernels.grouped import routed_swiglu
from moela.model.runtime import Runtime
from moela.model.block import REMAT_POLICIES, Block
from moela.model.transformer import abstract_model
from moela.parallel.experts import DISPATCH, buffer_rows, default_ragged
from moela.parallel.layout import Layout, state_bytes, variable_names
from moela.parallel.mesh import AXES, MeshError, mesh_shape
from moela.planner.chips import Chip
from moela.training.losses import loss_chunks
from moela.training.optim import optimizer
from moela.training.step import training_objective

GIB = 2**30
CONVENTION = "bytes per device; GiB = 2**30 bytes; chip capacities are the vendors' nominal HBM (moela.planner.chips)"
ASSUMPTIONS = (
    "activations: liveness peak, in program order, of one device's gradient jaxpr on its local problem "
    "(rows/(data*microbatches), seq/sequence, tensor-split dims divided by the tensor size)",
    "gradients in the parameter dtype, sharded like the parameters; a second copy accumulates microbatches",
    "optimizer: AdamW moments sharded like their parameters, scalar state replicated",
    "fsdp_gather: the largest layer's all-gathered weights plus its unreduced gradient (no prefetch overlap)",
    "expert parallelism (expert axis split): the island's difference from the local trace (ring: one "
    "visiting token block on E/n experts, inputs saved; gather: the pairs of n*M all-gathered tokens), "
    "counted as expert_island and included in activations",
    "not counted: ring-attention K/V blocks in flight, collective buffers, heap fragmentation, runtime reserves",
    "kv cache: ceil(serve_batch/data) rows per device; latent (MLA) or kv heads (GQA) not split over tensor",
)


class PlanError(ValueError):
    """A plan that cannot be made: a bad mesh, or a shape the mesh does not divide."""


def nbytes(aval) -> int:
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize if hasattr(aval, "dtype") else 0


def parse_mesh(text: str) -> dict[str, int]:
    """'data=64,tensor=8,sequence=4' -> sizes for ``parallel.mesh.AXES``; an axis left out is 1."""
    usage = (
        f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of {', '.join(AXES)} "
        f"(each at most once) and SIZE a positive integer (-1 for one axis with --devices), "
        "e.g. data=64,tensor=8,sequence=4"
    )
    sizes: dict[str, int] = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        try:
            size = int(value)
        except ValueError:
            raise PlanError(usage) from None
        if not eq or name not in AXES or name in sizes or (size < 1 and size != -1):
            raise PlanError(usage)
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in AXES}


def resolve_mesh(sizes: dict[str, int], devices: int | None = None) -> dict[str, int]:
    """Fill one -1 from a device count (``parallel.mesh.mesh_shape``); without one every size must be given."""
    if not devices:
        if -1 in sizes.values():
            raise PlanError(f"mesh {sizes}: give every axis a size (or one -1 together with --devices)")
        return sizes
    try:
        return dict(zip(AXES, mesh_shape(MeshConfig(**sizes), devices)))
    except MeshError as e:
        raise PlanError(str(e)) from None


def abstract_layout(sizes: dict[str, int], strategy: str) -> Layout:
    """The strategy's layout on an AbstractMesh (names and sizes only, no devices)."""
    return Layout.of(AbstractMesh(tuple(sizes[a] for a in AXES), AXES), strategy)


def optimizer_state_bytes(cfg: Config, params: nnx.State, layout: Layout) -> int:
    """``optimizer(cfg.train).init`` evaluated abstractly; moments divided like their parameter."""
    tx = optimizer(cfg.train)
    opt = jax.eval_shape(tx.init, params)
    mesh_shape = dict(layout.mesh.shape)

    def shards(_, var):  # a Variable holding its parameter's shard count, to mirror the moments' structure
        return var.replace(math.prod(mesh_shape[a] for a in layout.spec(variable_names(var)) if a is not None))

    per_leaf = optax.tree_map_params(
        tx, lambda leaf, n: nbytes(leaf) // n, opt, nnx.map_state(shards, params), transform_non_params=nbytes
    )
    return sum(jax.tree.leaves(per_leaf))


def local_model_config(cfg: ModelConfig, layout: Layout) -> ModelConfig:
    """The model one device computes: every tensor-split dim divided by its mesh axis size."""

    def split(value: int, name: str, what: str) -> int:
        n = layout.size(name)
        if value % n:
            raise PlanError(
                f"{what} = {value} cannot be split over mesh axis '{layout.axis(name)}' ({n} devices): "
                "change the mesh or the strategy"
            )
        return value // n

    a, e = cfg.attention, cfg.moe
    attention = dataclasses.replace(a, num_heads=split(a.num_heads, "heads", "model.attention.num_heads"))
    if a.kind == "gqa":
        attention = dataclasses.replace(
            attention, num_kv_heads=split(a.num_kv_heads, "kv_heads", "model.attention.num_kv_heads")
        )
    moe = dataclasses.replace(e, d_ff=split(e.d_ff, "mlp", "model.moe.d_ff")) if e.num_experts else e
    return dataclasses.replace(
        cfg,
        vocab_size=split(cfg.vocab_size, "vocab", "model.vocab_size"),
        d_ff=split(cfg.d_ff, "mlp", "model.d_ff"),
        attention=attention,
        moe=moe,
    )


def local_rows(layout: Layout, batch: int, seq: int, microbatches: int) -> tuple[int, int]:
    rows_split, seq_split = layout.size("batch") * microbatches, layout.size("length")
    if batch % rows_split:
        raise PlanError(
            f"batch {batch} is not divisible by data ({layout.size('batch')}) x microbatches "
            f"({microbatches}): every device needs whole rows of every microbatch"
        )
    if seq % seq_split:
        raise PlanError(f"seq {seq} is not divisible by the sequence axis ({seq_split})")
    return batch // rows_split, seq // seq_split


def abstract_batch(rows: int, seq: int) -> dict:
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
    return {
        "inputs": tokens,
        "targets": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "loss_mask": jax.ShapeDtypeStruct((rows, seq), jnp.float32),
    }


def gradient_jaxpr(cfg: Config, rows: int, seq: int, chunk_tokens: int):
    """The jaxpr of ``jax.grad`` of the training objective on one (micro)batch, traced abstractly."""
    graphdef, params, rest = nnx.split(abstract_model(cfg.model), nnx.Param, ...)

    def loss(p, r, batch):
        obj, _, _, aux = training_objective(
            graphdef, p, r, batch, z_coef=cfg.train.z_loss, chunk_tokens=chunk_tokens, rt=Runtime(cfg.runtime)
        )
        return obj / batch["loss_mask"].size + aux["aux_loss"] + jnp.sum(aux.get("mtp_ce", 0.0))

    return jax.make_jaxpr(jax.grad(loss))(params, rest, abstract_batch(rows, seq)).jaxpr


def saved_per_layer(jaxpr, counts: dict[str, int]) -> dict[str, int]:
    """Bytes per layer that autodiff keeps from the forward pass for the backward, by layer kind.

    Read off the gradient jaxpr: the forward scan over the layers of one kind stacks, per layer,
    every residual its backward needs (the scan carry x included; under ``runtime.remat`` only what
    the policy saves) as the scan's per-iteration outputs. The forward scans come first, in the
    model's order (dense, then MoE); ``{}`` if the jaxpr does not look like that."""
    kinds = [k for k, n in counts.items() if n]
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"][: len(kinds)]
    if [e.params["length"] for e in scans] != [counts[k] for k in kinds]:
        return {}
    return {k: sum(nbytes(v.aval) for v in e.outvars[scan_num_carry(e) :]) // counts[k] for k, e in zip(kinds, scans)}


_INPLACE = frozenset(
    """add sub mul div rem neg abs sign exp exp2 log log1p expm1 tanh logistic sqrt rsqrt pow
integer_pow square max min select_n clamp convert_element_type eq ne lt le gt ge and or not xor is_finite floor
ceil round erf erf_inv sin cos stop_gradient add_any copy copy_p nextafter shift_left shift_right_logical
shift_right_arithmetic dynamic_update_slice scatter scatter-add scatter_add""".split()
)
_VIEWS = frozenset({"reshape", "squeeze", "expand_dims"})  # bitcasts: the output aliases the input
_FUSED = frozenset({"broadcast_in_dim", "iota"})  # fused into their consumers, never materialised
_LOOPS = frozenset({"scan", "while"})  # outputs are allocated before the body runs


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jcore.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield v


def _output_bound(jaxpr) -> set:
    """The jaxpr's outputs and the values that become them in place (their buffers are outputs)."""
    bound = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jcore.Var))
    for eqn in reversed(jaxpr.eqns):
        name = eqn.primitive.name
        if (name in _INPLACE or name in _VIEWS) and len(eqn.outvars) == 1 and eqn.outvars[0] in bound:
            for v in eqn.invars:
                if isinstance(v, jcore.Var) and uses[v] == 1 and nbytes(v.aval) == nbytes(eqn.outvars[0].aval):
                    bound.add(v)
    return bound


def peak_bytes(jaxpr, exclude: set = frozenset()) -> int:
    """Peak bytes allocated while ``jaxpr`` runs in program order; inputs, constants and the values
    in ``exclude`` are not counted. See the module docstring for the rules."""
    last = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.invars if isinstance(v, jcore.Var)}
    last.update({v: len(jaxpr.eqns) for v in jaxpr.outvars if isinstance(v, jcore.Var)})
    buffer_of: dict = {}  # value -> buffer id
    buffers: dict = {}  # buffer id -> [bytes, number of live values in it]
    live = top = 0

    def release(v):
        nonlocal live
        b = buffer_of.pop(v, None)
        if b is not None:
            buffers[b][1] -= 1
            if not buffers[b][1]:
                live -= buffers.pop(b)[0]

    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        dying = {v for v in eqn.invars if isinstance(v, jcore.Var) and last.get(v) == i}
        outs = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
        if name in _VIEWS:  # the output is a view of the input: same buffer (or untracked, like the input)
            if eqn.invars[0] in buffer_of:
                buffer_of[outs[0]] = buffer_of[eqn.invars[0]]
                buffers[buffer_of[outs[0]]][1] += 1
        else:
            if name in _INPLACE:
                for v in dying:
                    release(v)
            sizes = [0 if name in _FUSED or v in exclude else nbytes(v.aval) for v in outs]
            inner = max((peak_bytes(j) for j in _subjaxprs(eqn)), default=0)
            top = max(top, live + (sum(sizes) + inner if name in _LOOPS else max(sum(sizes), inner)))
            for v, size in zip(outs, sizes):
                buffer_of[v], buffers[id(v)] = id(v), [size, 1]
                live += size
        for v in dying:
            release(v)
        for v in outs:
            if v not in last:
                release(v)
    return top


def activation_bytes(jaxpr) -> int:
    """Peak bytes of a gradient jaxpr's intermediates: its inputs and its gradient outputs excluded."""
    return peak_bytes(jaxpr, exclude=_output_bound(jaxpr))


def _routed_experts_memory(cfg: ModelConfig, runtime: RuntimeConfig, rows: int, experts: int) -> tuple[int, int]:
    """(bytes saved for the backward, peak bytes of forward + backward) of the routed experts
    (``kernels.grouped.routed_swiglu`` under ``runtime.remat``) on ``rows`` token rows and ``experts``
    experts; inputs, weight gradients and dx not counted."""
    moe, cd = cfg.moe, jnp.dtype(cfg.compute_dtype)
    k, sds = moe.experts_per_token, jax.ShapeDtypeStruct
    args = (
        sds((rows, cfg.d_model), cd),
        sds((rows, k), jnp.float32),
        sds((experts, cfg.d_model, moe.d_ff), cd),
        sds((experts, cfg.d_model, moe.d_ff), cd),
        sds((experts, moe.d_ff, cfg.d_model), cd),
    )
    ids = sds((rows, k), jnp.int32)
    fresh = []

    def forward_backward(ids, *args, residuals=False):
        def fn(x, w, wg, wu, wd):
            return routed_swiglu(
                x, w, ids, wg, wu, wd, backend=runtime.grouped_matmul, block=runtime.grouped_block_rows
            )

        if runtime.remat != "none":
            fn = jax.checkpoint(fn, policy=REMAT_POLICIES[runtime.remat], prevent_cse=False)
        y, vjp_fn = jax.vjp(fn, *args)
        if not residuals:
            return vjp_fn(y)
        fresh.extend(id(v) not in {id(a) for a in (ids, *args)} for v in jax.tree.leaves(vjp_fn))
        return jax.tree.leaves(vjp_fn)

    leaves = jax.eval_shape(lambda *a: forward_backward(*a, residuals=True), ids, *args)
    jaxpr = jax.make_jaxpr(forward_backward)(ids, *args).jaxpr
    return sum(nbytes(v) for v, new in zip(leaves, fresh) if new), activation_bytes(jaxpr)


def expert_island_bytes(
    local: ModelConfig, runtime: RuntimeConfig, layout: Layout, tokens: int, ragged: bool | None = None
) -> tuple[int, int]:
    """(per MoE layer saved, transient) bytes the expert-parallel island adds to the local trace,
    which has this device's M tokens on all E experts. Either may be negative.

    ``ring`` dispatch (default): a visiting block of M token rows meets E/n experts per step,
    and the backward recomputes from the saved inputs, so the saved bytes are x, weights and
    ids only (the local trace's expert residuals are not kept; under remat, nothing is kept
    across layers at all) and the transient is one step
    on E/n experts plus the visitor in flight twice (x, dy, dx and the routing arrays).
    ``gather``: all-gathers the token rows of the n devices and sorts all their n·M·k pairs,
    so a device's buffers are those of n·M tokens on E/n experts, plus the gathered rows,
    routing and cotangent [n·M, ·].
    ``all_to_all``: the M·k sorted pairs (rows and routing) go out in a send buffer (ragged: the
    sorted rows themselves; padded: n·C rows beside them) into a receive buffer (ragged: C rows;
    padded: n·C), C from ``runtime.expert_capacity`` (``parallel.experts.buffer_rows``), and the
    results come back the same way; the grouped SwiGLU runs on the received rows, one pair each, on
    E/n experts. Autodiff keeps its residuals plus the received rows and the returned results (for
    d(routing weights)). ``ragged`` defaults from the mesh's platform (``default_ragged``)."""
    n, e = layout.size("expert"), local.moe.num_experts
    if n == 1 or not local.num_moe_layers or layout.axis("expert") not in (layout.axis("batch"), layout.axis("length")):
        return 0, 0
    row, k = local.d_model * jnp.dtype(local.compute_dtype).itemsize, local.moe.experts_per_token
    saved_1, peak_1 = _routed_experts_memory(local, runtime, tokens, e)
    if DISPATCH.resolve(runtime.expert_dispatch) == "ring":
        step_peak = _routed_experts_memory(local, dataclasses.replace(runtime, remat="none"), tokens, e // n)[1]
        # Under remat the whole block is recomputed: the island keeps nothing across layers.
        saved = tokens * (row + 8 * k) - saved_1 if runtime.remat == "none" else 0
        return saved, step_peak - peak_1 + 2 * tokens * (3 * row + 12 * k)
    if DISPATCH.resolve(runtime.expert_dispatch) == "all_to_all":
        pairs = tokens * k
        ragged = default_ragged(layout.mesh) if ragged is None else ragged
        cap = buffer_rows(pairs, n, runtime.expert_capacity, ragged, most=tokens * min(k, e // n))
        recv, send = (cap, pairs) if ragged else (n * cap, pairs + n * cap)
        one = dataclasses.replace(local, moe=dataclasses.replace(local.moe, experts_per_token=1))
        saved_r, peak_r = _routed_experts_memory(one, runtime, recv, e // n)
        routing = 20 * pairs  # the sorted pairs' order, token, id, destination (int32) and weight (f32)
        kept = (recv + pairs) * row + routing if runtime.remat == "none" else 0
        return saved_r + kept - saved_1, peak_r - peak_1 + (send + recv) * (2 * row + 4) + routing
    saved_n, peak_n = _routed_experts_memory(local, runtime, n * tokens, e // n)
    gathered = (n - 1) * tokens * (2 * row + 8 * k)
    return max(0, saved_n - saved_1), max(0, peak_n - peak_1) + gathered


def kv_cache_bytes(model: ModelConfig, cache_dtype: str, batch: int, length: int, data: int) -> int:
    """Serving cache per device: ceil(batch / data) rows of ``length`` tokens, every layer."""
    a = model.attention
    per_token = a.kv_lora_rank + a.qk_rope_head_dim if a.kind == "mla" else 2 * a.num_kv_heads * a.head_dim
    return -(-batch // data) * length * model.num_layers * per_token * jnp.dtype(cache_dtype).itemsize


def gathered_layer_bytes(local: ModelConfig, counts: dict[str, int]) -> int:
    """The largest layer's weights as computed (all-gathered over data) plus its full gradient."""
    sizes = [
        sum(
            nbytes(v)
            for v in jax.tree.leaves(
                nnx.state(nnx.eval_shape(lambda moe=kind == "moe": Block(local, moe, rngs=nnx.Rngs(0))), nnx.Param)
            )
        )
        for kind, n in counts.items()
        if n
    ]
    return 2 * max(sizes, default=0)


def plan(
    cfg: Config,
    mesh: dict[str, int],
    strategy: str,
    batch: int,
    seq: int,
    serve_batch: int | None = None,
    serve_len: int | None = None,
    accelerator: bool = True,
) -> dict:
    """The plan as a dict: ``bytes`` per device, ``saved_per_layer`` (bytes), shapes and assumptions.

    ``accelerator`` plans the TPU/GPU program ("auto" means ``ragged_dot`` and the ragged
    ``all_to_all`` dispatch there); False plans what the current backend compiles (on CPU the
    blocked grouped matmul, the ring, the padded exchange), as the tests do."""
    layout = abstract_layout(mesh, strategy)
    model, train, m, runtime = cfg.model, cfg.train, cfg.train.microbatches, cfg.runtime
    if accelerator:  # what "auto" means on TPU (GPU alike): ragged_dot, the ragged all_to_all
        grouped = "ragged_dot" if runtime.grouped_matmul == "auto" else runtime.grouped_matmul
        runtime = dataclasses.replace(
            runtime, grouped_matmul=grouped, expert_dispatch=DISPATCH.resolve(runtime.expert_dispatch, on="tpu")
        )
        cfg = dataclasses.replace(cfg, runtime=runtime)
    rows, tokens = local_rows(layout, batch, seq, m)
    local = local_model_config(model, layout)
    graph = abstract_model(model)
    params = nnx.state(graph, nnx.Param)
    b = {"params": state_bytes(nnx.state(graph), layout), "gradients": state_bytes(params, layout)}
    b["grad_accumulator"] = b["gradients"] if m > 1 else 0
    b["optimizer"] = optimizer_state_bytes(cfg, params, layout)

    # The chunked loss keeps the global batch's chunk count: ~loss_chunk_tokens rows per chunk
    # over all devices, so each device's share is loss_chunk_tokens / (data * sequence).
    split = layout.size("batch") * layout.size("length")
    jaxpr = gradient_jaxpr(
        dataclasses.replace(cfg, model=local), rows, tokens, max(1, train.loss_chunk_tokens // split)
    )
    counts = {"dense": model.num_dense_layers, "moe": model.num_moe_layers}
    saved = saved_per_layer(jaxpr, counts)
    island_saved, island_transient = expert_island_bytes(local, runtime, layout, rows * tokens, ragged=accelerator)
    if island_saved and "moe" in saved:
        saved["moe"] += island_saved
    island_blocks = counts["moe"] + (model.mtp_depth if counts["moe"] else 0)  # MTP blocks are MoE blocks too
    b["expert_island"] = island_saved * island_blocks + island_transient
    b["activations"] = activation_bytes(jaxpr) + b["expert_island"]
    b["activations_saved"] = sum(saved[k] * counts[k] for k in saved)
    b["fsdp_gather"] = gathered_layer_bytes(local, counts) if layout.axis("embed") else 0
    b["train_total"] = sum(
        b[k] for k in ("params", "gradients", "grad_accumulator", "optimizer", "activations", "fsdp_gather")
    )
    serve_batch = cfg.serve.max_batch if serve_batch is None else serve_batch
    serve_len = seq if serve_len is None else serve_len
    b["kv_cache"] = kv_cache_bytes(model, cfg.serve.cache_dtype, serve_batch, serve_len, layout.size("batch"))
    b["serve_total"] = b["params"] + b["kv_cache"]
    return {
        "config": cfg.name,
        "mesh": mesh,
        "devices": math.prod(mesh.values()),
        "strategy": strategy,
        "batch": batch,
        "seq": seq,
        "microbatches": m,
        "local_rows": rows,
        "local_seq": tokens,
        "loss_chunks": loss_chunks(batch // m, seq, train.loss_chunk_tokens),
        "remat": runtime.remat,
        "param_dtype": model.param_dtype,
        "compute_dtype": model.compute_dtype,
        "grouped_matmul": runtime.grouped_matmul,
        "cache_dtype": cfg.serve.cache_dtype,
        "serve_batch": serve_batch,
        "serve_len": serve_len,
        "bytes": b,
        "saved_per_layer": saved,
        "convention": CONVENTION,
        "assumptions": ASSUMPTIONS,
    }


def fits(result: dict, chips: dict[str, Chip]) -> dict[str, dict]:
    """Per chip: its HBM in bytes and whether the training and the serving totals fit in it."""
    b = result["bytes"]
    return {
        name: {
            "hbm_bytes": c.hbm_bytes,
            "train": b["train_total"] <= c.hbm_bytes,
            "serve": b["serve_total"] <= c.hbm_bytes,
        }
        for name, c in chips.items()
    }


def human(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:8.2f} MiB"


def format_plan(result: dict, table: dict[str, dict]) -> str:
    r, b, h = result, result["bytes"], lambda n: human(n).strip()
    saved = ", ".join(f"{k} {h(v)}/layer" for k, v in r["saved_per_layer"].items())
    rows = [
        ("parameters", b["params"], f"{r['param_dtype']}, sharded by {r['strategy']}"),
        (
            "gradients",
            b["gradients"] + b["grad_accumulator"],
            "+ microbatch accumulator" if b["grad_accumulator"] else "like the parameters",
        ),
        ("optimizer", b["optimizer"], "AdamW moments, sharded like their parameters"),
        (
            "activations",
            b["activations"],
            f"peak; saved for backward {h(b['activations_saved'])}"
            + (f" ({saved})" if saved else "")
            + (
                f"; expert-parallel island {'+' if b['expert_island'] > 0 else '-'}{h(abs(b['expert_island']))}"
                if b["expert_island"]
                else ""
            ),
        ),
        ("fsdp gather", b["fsdp_gather"], "largest layer all-gathered + its unreduced gradient"),
        ("training total", b["train_total"], ""),
        ("kv cache", b["kv_cache"], f"serving {r['serve_batch']} x {r['serve_len']} tokens, {r['cache_dtype']}"),
        ("serving total", b["serve_total"], "parameters + kv cache"),
    ]
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['config']}: strategy {r['strategy']} on mesh {mesh} ({r['devices']} devices)",
        f"training: batch {r['batch']} x seq {r['seq']}, {r['microbatches']} microbatch(es), remat {r['remat']}, "
        f"compute {r['compute_dtype']}; per device and microbatch {r['local_rows']} rows x {r['local_seq']} "
        "tokens",
        "per device:",
    ]
    lines += [f"  {name:<16}{human(n)}  {note}".rstrip() for name, n, note in rows if n or name != "fsdp gather"]
    lines.append(f"{'chip':<12}{'HBM':>8}  train  serve")
    mark = {True: "fits ", False: "NO   "}
    lines += [
        f"{name:<12}{row['hbm_bytes'] / GIB:>4.0f} GiB  {mark[row['train']]}  {mark[row['serve']]}".rstrip()
        for name, row in table.items()
    ]
    return "\n".join(lines)
