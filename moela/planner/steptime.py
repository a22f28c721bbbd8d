"""How long one training step takes: compute, HBM traffic and every collective, per device.

    python -m moela.planner --config deepseek_v3 --chip v5p --devices 512 --mesh data=64,tensor=8 \\
        --strategy ep_tp --batch 8192 --seq 4096          # memory plan + step-time table

The model is physics with stated assumptions, not a fit. For one device and one microbatch it
walks the layers' ops at their *local* shapes (tokens split over data/fsdp/expert/sequence,
heads, d_ff and vocab over tensor, experts over expert) and charges:

* **matmuls**: each at the roofline of its shape, max(FLOPs / (peak · matmul_eff),
  bytes / (HBM · hbm_eff)): a small matmul (few tokens per expert, a down-projection every tensor
  rank repeats) is charged its weight traffic, not its FLOPs. Backward = 2× forward (dX and dW).
* **attention scores** (flash): FLOPs / (peak · attention_eff); the backward recomputes the
  scores, so it costs 2.5× the forward (FlashAttention-2's count), not 2×.
* **memory-bound ops**: norms, residual adds, SwiGLU, RoPE, the MoE permute/un-permute, the
  loss' softmax: bytes / (HBM · hbm_eff); backward 2× forward; the AdamW update once per step.
* **remat**: a policy recomputes some forward work in the backward (``REMAT``).
* **collectives**, from bytes and the axis' links (``Network``): tensor-parallel all-reduces
  (2 per layer forward, 2 backward), the expert dispatch (``ring``, ``gather``, ``all_to_all``),
  ring-attention K/V hops, FSDP all-gathers (forward and backward) and gradient reduce-scatters
  (per microbatch), the data-parallel gradient all-reduce (per step).

Overlap, stated: tensor-parallel collectives and the expert dispatch sit on the critical path
(their inputs are the op just computed): fully exposed. Ring-attention hops overlap with the
attention block each hop carries. FSDP gathers are prefetched a layer ahead: exposed only where a
microbatch's FSDP traffic exceeds its compute, plus the first layer's gather. The gradient
all-reduce overlaps with the last microbatch's backward. A pipeline (published GPU runs; moela
has none) adds the (p − 1)/v bubble.

MFU counts the model FLOPs of ``moela.model.flops`` (6·N_active + attention scores, causal
halving unless ``causal=False``) over step time × chips × peak bf16; HFU counts what the
device executes (remat, the flash backward, repeated projections).
"""

from __future__ import annotations

import dataclasses
import math

import functools

from moela.configs.schema import ModelConfig
from moela.model.flops import training_flops_per_token
from moela.planner.chips import Chip
from moela.planner.network import Network, Parallelism, moela_parallelism  # noqa: F401 (re-exported)

BF16 = 2


@dataclasses.dataclass(frozen=True)
class Remat:
    """Fractions of the forward a policy recomputes in the backward: projections (every
    non-attention matmul, and the collectives that follow them), attention scores, elementwise."""

    matmuls: float
    attention: float
    elementwise: float


REMAT = {
    "none": Remat(0, 0, 0),
    "full": Remat(1, 1, 1),
    "dots": Remat(0, 0, 1),  # every matmul output saved (attention's batched dots too)
    "dots_no_batch": Remat(0, 1, 1),  # projections saved, attention recomputed
}


# -- the work of one layer ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Matmul:
    """[rows, k] x [k, n] on one device, forward; ``model`` is what the MFU convention counts."""

    name: str
    rows: float
    k: float
    n: float
    weights: float  # weight elements read (all experts' for a grouped matmul)
    model_flops: float
    groups: float = 0  # a grouped matmul over this many experts (each one's rows padded to a tile)

    @property
    def flops(self) -> float:
        return 2 * self.rows * self.k * self.n

    def executed_flops(self, chip: Chip) -> float:
        """What the matrix unit runs: k and n padded to its tile, each group's rows padded to the
        grouped matmul's row tile (half a tile idle per expert on average)."""
        rows = self.rows + self.groups * chip.group_rows / 2
        return 2 * rows * _pad(self.k, chip.mxu) * _pad(self.n, chip.mxu)


def _pad(x: float, tile: int) -> float:
    return math.ceil(x / tile) * tile if x >= tile / 2 else x  # a dim under half a tile: packed, not padded


def layer_matmuls(
    model: ModelConfig, par: Parallelism, tokens: float, moe: bool, capacity: float = 0.0
) -> list[Matmul]:
    """One layer's matmuls for ``tokens`` local tokens, at the local (tensor-split) shapes.
    Projections not split over tensor (MLA's down-projections, the router) are repeated on every
    tensor rank: the device pays them whole, the model FLOPs count them once."""
    t, a, d = par.tensor, model.attention, model.d_model
    ops: list[tuple[str, float, float, bool]] = []  # name, k, n, split over tensor
    if a.kind == "mla":
        if a.q_lora_rank:
            ops += [("q_down", d, a.q_lora_rank, False), ("q_up", a.q_lora_rank, a.num_heads * a.qk_head_dim, True)]
        else:
            ops.append(("q", d, a.num_heads * a.qk_head_dim, True))
        ops += [
            ("kv_down", d, a.kv_lora_rank + a.qk_rope_head_dim, False),
            ("kv_up", a.kv_lora_rank, a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), True),
        ]
    else:
        ops += [("q", d, a.num_heads * a.head_dim, True), ("kv", d, 2 * a.num_kv_heads * a.head_dim, True)]
    ops.append(("o", a.num_heads * a.out_head_dim, d, True))
    if not moe:
        ops.append(("mlp", d, 3 * model.d_ff, True))
    else:
        e = model.moe
        ops.append(("router", d, e.num_experts, False))
        if e.num_shared_experts:
            ops.append(("shared", d, 3 * e.num_shared_experts * e.d_ff, True))
    # The tensor group shares its tokens: the model FLOPs of an op are 2·tokens·k·n once per
    # group, a 1/t share per device, whether or not the device computes it whole.
    out = [
        Matmul(name, tokens, k, n / t if split else n, k * n / (t if split else 1), 2 * tokens * k * n / t)
        for name, k, n, split in ops
    ]
    if moe:
        e = model.moe
        f, pairs, local = e.d_ff / t, tokens * e.experts_per_token, e.num_experts / par.expert
        rows = pairs * capacity if capacity else pairs  # a capacity pads every expert to c x its share
        out.append(Matmul("routed_experts", rows, d, 3 * f, local * 3 * d * f, 2 * pairs * d * 3 * f, groups=local))
    return out


def matmul_time(m: Matmul, chip: Chip, s: int, fp8: bool = False) -> float:
    """Roofline of one forward matmul: padded FLOPs at ``matmul_eff`` of the peak (fp8's where the
    run computes matmuls in fp8) against the activations and weights read and the output written."""
    eff = chip.grouped_eff if m.groups else chip.matmul_eff
    nbytes = s * (m.rows * m.k + m.weights + m.rows * m.n)
    if fp8 and chip.fp8_flops:  # quantized operands: one more pass reading bf16, writing fp8
        eff *= chip.fp8_eff / chip.matmul_eff
        compute = m.executed_flops(chip) / (chip.fp8_flops * eff)
        return max(compute, nbytes / (chip.hbm_bw * chip.hbm_eff)) + 3 * (m.rows * m.k) / (chip.hbm_bw * chip.hbm_eff)
    return max(m.executed_flops(chip) / (chip.bf16_flops * eff), nbytes / (chip.hbm_bw * chip.hbm_eff))


def elementwise_bytes(model: ModelConfig, par: Parallelism, moe: bool) -> float:
    """Forward HBM bytes per token of one layer's memory-bound ops, in elements (× dtype size):
    pre-norms read and write D, residual adds read 2 D and write D, SwiGLU reads 2 F and writes F,
    MLA's latent norms and RoPE, the MoE permute (k rows of D out and back) and combine."""
    t, a, d = par.tensor, model.attention, model.d_model
    h = a.num_heads / t
    n = 2 * (2 * d) + 2 * (3 * d)  # two pre-norms, two residual adds
    if a.kind == "mla":
        n += 2 * a.q_lora_rank + 2 * a.kv_lora_rank + 2 * h * a.qk_rope_head_dim + h * a.qk_head_dim
    else:
        n += 2 * (h + a.num_kv_heads / t) * a.head_dim
    if not moe:
        return n + 3 * model.d_ff / t
    e = model.moe
    f, k = e.d_ff / t, e.experts_per_token
    return n + 4 * k * d + 3 * k * f + 3 * e.num_shared_experts * e.d_ff / t + 2 * e.num_experts


ATTENTION_BLOCK = 512  # flash attention's key block: causal masking skips whole blocks only


def attention_flops(model: ModelConfig, par: Parallelism, tokens: float, seq: int, chip: Chip) -> tuple[float, float]:
    """(model, executed) forward FLOPs of one layer's scores and weighted values on one device.
    The model's count is causal ((S + 1)/2 keys per query); the kernel computes every block that
    touches the diagonal ((S + block)/2) with head dims padded to the matrix unit's tile."""
    a = model.attention
    heads = a.num_heads / par.tensor
    model_flops = 2 * tokens * (seq + 1) / 2 * heads * (a.qk_head_dim + a.out_head_dim)
    block = min(ATTENTION_BLOCK, seq)
    executed = 2 * tokens * (seq + block) / 2 * heads * (_pad(a.qk_head_dim, chip.mxu) + _pad(a.out_head_dim, chip.mxu))
    return model_flops, executed


# -- one step -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one step trains: the model, global batch × seq, microbatches, remat, expert dispatch,
    and the dtypes' sizes (parameters and gradients; AdamW moments are float32)."""

    model: ModelConfig
    batch: int
    seq: int
    microbatches: int = 1
    remat: str | Remat = "full"  # a REMAT policy name, or the fractions a custom policy recomputes
    dispatch: str = "all_to_all"
    param_bytes: int = BF16
    causal: bool = True  # the MFU convention: attention FLOPs with causal halving
    fp8: bool = False  # matmuls in fp8 (at the chip's fp8 peak); attention and MFU stay bf16
    capacity_factor: float = 0.0  # 0: dropless; c > 0: every expert computes c x its average share
    # How other systems' expert dispatch differs from moela's (published runs): the dispatch leg in
    # fp8; DeepEP's node-limited exchange (a token crosses to at most ``moe.topk_group`` nodes, once
    # per node, and fans out over NVLink); the exchange hidden behind another microbatch's compute
    # (Megatron's 1F1B all-to-all overlap, DeepSeek's DualPipe).
    dispatch_fp8: bool = False
    node_limited: bool = False
    overlap_dispatch: bool = False


def _dispatch_bytes(method: str, tokens: float, d: int, k: int, n: int, s: int) -> list[tuple[str, float]]:
    """The forward collectives of one MoE layer's expert dispatch over n devices: (kind, bytes)."""
    routing = 8 * k  # ids (int32) and weights (float32) per token
    if method == "all_to_all":  # pairs out and results back
        return [("all_to_all", tokens * k * d * s)] * 2
    if method == "gather":  # gathered tokens, reduce-scattered partial outputs
        return [("all_gather", n * tokens * (d * s + routing)), ("reduce_scatter", n * tokens * d * s)]
    # ring: n hops of the visiting block (rows, routing) with its output accumulator
    return [("ppermute", tokens * (2 * d * s + routing))] * n


def dispatch_seconds(net: Network, method: str, tokens: float, model: ModelConfig, s: int, work: Workload) -> float:
    """One MoE layer's forward expert exchange (dispatch and combine) over the expert axis."""
    e, d = model.moe, model.d_model
    if method != "all_to_all" or not (work.node_limited or work.dispatch_fp8):
        return sum(
            net.time(kind, "expert", b)
            for kind, b in _dispatch_bytes(method, tokens, d, e.experts_per_token, net.par.expert, s)
        )
    out = 0.0
    for leg_bytes in (1 if work.dispatch_fp8 else s, s):  # dispatch, combine
        if work.node_limited and net.chip.network == "switch":
            c, n = net.chip, net.par.expert
            g = max(1, min(n, c.node // net._inner("expert")))
            remote = min(e.experts_per_token, e.topk_group) * (n - g) / n  # one copy per remote node
            out += tokens * d * leg_bytes * (remote / c.dcn_bw + e.experts_per_token * (g - 1) / n / c.link_bw)
        else:
            out += net.time("all_to_all", "expert", tokens * e.experts_per_token * d * leg_bytes)
    return out


def step_time(work: Workload, par: Parallelism, chip: Chip) -> dict:
    """Predicted seconds of one training step per term, the totals and MFU (module docstring)."""
    model, net = work.model, Network(chip, par)
    s = BF16 if model.compute_dtype == "bfloat16" else 4
    dispatch = resolve_dispatch(work.dispatch, chip)

    def exposed(comm: float, busy: float) -> float:
        """What a collective adds when it can run beside ``busy`` seconds of independent compute
        (on a CPU host the same cores copy and compute: nothing hides)."""
        return max(0.0, comm - busy) if chip.overlap else comm

    remat = REMAT[work.remat] if isinstance(work.remat, str) else work.remat
    m = work.microbatches
    rows = work.batch / (m * par.row_split)
    tokens = rows * work.seq / par.sequence  # local tokens of one microbatch
    stage = {"dense": model.num_dense_layers / par.pipeline, "moe": model.num_moe_layers / par.pipeline}
    stage["moe" if model.num_moe_layers else "dense"] += model.mtp_depth  # MTP blocks, on the last stage
    t = dict.fromkeys(
        ("matmuls", "attention", "memory_bound", "tensor_parallel", "expert_dispatch", "ring_attention"), 0.0
    )
    raw = {"tensor_parallel": 0.0, "expert_dispatch": 0.0, "ring_attention": 0.0, "fsdp": 0.0, "data_parallel": 0.0}
    hw_flops = 0.0
    for kind, layers in stage.items():
        if not layers:
            continue
        moe = kind == "moe"
        mms = layer_matmuls(model, par, tokens, moe, work.capacity_factor)
        fwd = sum(matmul_time(mm, chip, s, work.fp8) for mm in mms)
        t["matmuls"] += layers * fwd * (3 + remat.matmuls)
        hw_flops += layers * sum(mm.flops for mm in mms) * (3 + remat.matmuls)
        af, executed = attention_flops(model, par, tokens, work.seq, chip)
        attn = executed / (chip.bf16_flops * chip.attention_eff)
        t["attention"] += layers * attn * (1 + chip.attention_bwd + remat.attention)
        hw_flops += layers * executed * (1 + chip.attention_bwd + remat.attention)
        eb = tokens * elementwise_bytes(model, par, moe) * s / (chip.hbm_bw * chip.hbm_eff)
        t["memory_bound"] += layers * eb * (3 + remat.elementwise)
        # Activations all-reduced over tensor: 2 in the forward (and again under remat), on the
        # critical path; 2 in the backward (dX), which overlap with the weight-gradient matmuls
        # (half the backward's matmul time) that do not wait for them.
        ar = net.time("all_reduce", "tensor", tokens * model.d_model * s)
        t["tensor_parallel"] += layers * (2 * ar * (1 + remat.matmuls) + exposed(2 * ar, fwd))
        raw["tensor_parallel"] += layers * 2 * ar * (2 + remat.matmuls)
        if moe and par.expert > 1:
            one = dispatch_seconds(net, dispatch, tokens, model, s, work)
            moved = layers * one * (3 + remat.matmuls)  # the backward moves twice the forward
            raw["expert_dispatch"] += moved
            busy = layers * (fwd * (3 + remat.matmuls) + attn * (1 + chip.attention_bwd + remat.attention))
            t["expert_dispatch"] += exposed(moved, busy) if work.overlap_dispatch else moved
        if par.sequence > 1:  # K/V hops, each hidden behind the attention block it carries
            a = model.attention
            kv = tokens * a.num_heads / par.tensor * (a.qk_head_dim + a.out_head_dim) * s
            hops = par.sequence - 1
            fwd_hop, bwd_hop = net.time("ppermute", "sequence", kv), net.time("ppermute", "sequence", 2 * kv)
            fwd_att, bwd_att = attn / par.sequence, chip.attention_bwd * attn / par.sequence
            hop = exposed(fwd_hop, fwd_att) * (1 + remat.attention) + exposed(bwd_hop, bwd_att)
            t["ring_attention"] += layers * hops * hop
            raw["ring_attention"] += layers * hops * (fwd_hop * (1 + remat.attention) + bwd_hop)
    # The embedding gather and the LM head with its float32 softmax, on the last stage, once for
    # the model and once per MTP depth (each with its [2D -> D] projection).
    vocab, heads = model.vocab_size / par.tensor, 1 + model.mtp_depth
    head = Matmul("lm_head", tokens, model.d_model, vocab, model.d_model * vocab, 0)
    proj = Matmul("mtp_proj", tokens, 2 * model.d_model, model.d_model, 2 * model.d_model**2, 0)
    t["matmuls"] += 3 * (heads * matmul_time(head, chip, s, work.fp8) + model.mtp_depth * matmul_time(proj, chip, s))
    hw_flops += 3 * (heads * head.flops + model.mtp_depth * proj.flops)
    loss_bytes = tokens * (3 * 4 * vocab + 2 * model.d_model * s)  # f32 logits out, softmax, gradient
    t["memory_bound"] += heads * loss_bytes / (chip.hbm_bw * chip.hbm_eff)
    t["tensor_parallel"] += heads * net.time("all_reduce", "tensor", tokens * model.d_model * s)
    compute_mb = t["matmuls"] + t["attention"] + t["memory_bound"]
    per_mb = sum(t.values())

    # Weights: FSDP gathers (forward, backward) and reduce-scatters per microbatch; the gradient
    # all-reduce over the replicas once per step.
    dense, experts, embed = weight_elements(model)
    local_dense = (dense + embed) / (par.tensor * par.pipeline)
    local_experts = experts / (par.tensor * par.pipeline * par.expert)
    pb = work.param_bytes
    layer_share = 1 / max(1, model.num_layers / par.pipeline)
    fsdp = 3 * net.time("all_gather", "fsdp", (local_dense + local_experts) * pb)
    raw["fsdp"] = m * fsdp
    exposed_fsdp = m * exposed(fsdp, compute_mb) + (fsdp / 3 * layer_share if chip.overlap else 0.0)
    replicas = ("data", "dcn_data", "sequence")
    grads = sum(net.time("all_reduce", ax, local_experts * pb / par.fsdp) for ax in replicas)
    grads += sum(net.time("all_reduce", ax, local_dense * pb / par.fsdp) for ax in (*replicas, "expert"))
    raw["data_parallel"] = grads
    backward_mb = compute_mb * 2 / (3 + remat.matmuls)
    exposed_dp = exposed(grads, backward_mb)
    local_params = (local_dense + local_experts) / par.fsdp
    optimizer = local_params * (2 * pb + pb + 4 * 4) / (chip.hbm_bw * chip.hbm_eff)
    bubble = (par.pipeline - 1) / par.virtual * per_mb if par.pipeline > 1 else 0.0

    terms = {k: m * v for k, v in t.items()}
    terms.update(fsdp=exposed_fsdp, data_parallel=exposed_dp, optimizer=optimizer, pipeline_bubble=bubble)
    step = sum(terms.values())
    tokens_step = work.batch * work.seq
    convention = model_flops_per_token(model, work.seq, work.causal)
    model_flops = convention * tokens_step
    per_step = ("tensor_parallel", "expert_dispatch", "ring_attention")
    return {
        "step_s": step,
        "terms_s": terms,
        "collectives_s": {k: v * (m if k in per_step else 1) for k, v in raw.items()},
        "dominant": max(terms, key=terms.get),
        "tokens_per_s_per_chip": tokens_step / step / par.chips,
        "mfu": model_flops / (step * par.chips * chip.bf16_flops),
        "hfu": hw_flops * m / (step * chip.bf16_flops),
        "dispatch": dispatch,
        "model_flops_per_token": convention,
        "local_tokens_per_microbatch": tokens,
    }


@functools.lru_cache(maxsize=256)
def model_flops_per_token(model: ModelConfig, seq: int, causal: bool) -> int:
    """``moela.model.flops``' count (builds the abstract model once per config: cached)."""
    return training_flops_per_token(model, seq, causal_halving=causal)["total"]


def resolve_dispatch(name: str, chip: Chip) -> str:
    """``auto``: ``all_to_all`` on TPUs and GPUs (the ragged exchange moves k·M rows each way,
    never more than the ring's n·M: docs/design.md#expert-dispatch), ``ring`` on CPU hosts, where
    the padded exchange's worst-case buffers move n·k·M rows."""
    if name != "auto":
        return name
    return "ring" if chip.network == "host" else "all_to_all"


TERMS = {
    "matmuls": "projections, MLP and experts at their rooflines (x3 fwd+bwd, + remat)",
    "attention": "flash attention scores (fwd + 2.5x bwd, + remat)",
    "memory_bound": "norms, residuals, SwiGLU, RoPE, MoE permute, loss softmax (HBM)",
    "tensor_parallel": "activation all-reduces over tensor (exposed)",
    "expert_dispatch": "token exchange with the expert axis (exposed)",
    "ring_attention": "K/V hops over sequence not hidden by their attention block",
    "fsdp": "weight all-gathers / gradient reduce-scatters not hidden by compute",
    "data_parallel": "gradient all-reduce not hidden by the last backward",
    "optimizer": "AdamW update (HBM)",
    "pipeline_bubble": "(p-1)/v idle microbatch slots",
}


def format_steptime(r: dict, chip: str, chips: int) -> str:
    """The step-time table: one line per term (seconds, share of the step, what it is)."""
    lines = [
        f"step time on {chips} x {chip}: {r['step_s']:.3f} s, {r['tokens_per_s_per_chip']:.0f} tokens/s/chip, "
        f"MFU {r['mfu']:.1%} (HFU {r['hfu']:.1%}), dominant: {r['dominant']}",
        f"  {'term':<17}{'seconds':>10}{'share':>8}  what",
    ]
    for name, secs in r["terms_s"].items():
        if secs:
            lines.append(f"  {name:<17}{secs:>10.4f}{secs / r['step_s']:>8.1%}  {TERMS[name]}")
    raw = ", ".join(f"{k} {v:.3f} s" for k, v in r["collectives_s"].items() if v)
    if raw:
        lines.append(f"  collectives before overlap: {raw}")
    return "\n".join(lines)


def weight_elements(model: ModelConfig) -> tuple[float, float, float]:
    """(dense layer weights, routed expert weights, embedding + LM head) element counts, from the
    dims (no model is built: the search calls this thousands of times)."""
    a, d = model.attention, model.d_model
    if a.kind == "mla":
        q = (
            d * a.q_lora_rank + a.q_lora_rank * a.num_heads * a.qk_head_dim
            if a.q_lora_rank
            else d * a.num_heads * a.qk_head_dim
        )
        attn = (
            q
            + d * (a.kv_lora_rank + a.qk_rope_head_dim)
            + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        )
    else:
        attn = d * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    attn += a.num_heads * a.out_head_dim * d
    e = model.moe
    # Multi-token-prediction depths: one block each (MoE when the model has experts) + [2D -> D].
    moe_blocks = model.num_moe_layers + (model.mtp_depth if model.num_moe_layers else 0)
    dense_blocks = model.num_dense_layers + (0 if model.num_moe_layers else model.mtp_depth)
    dense = (model.num_layers + model.mtp_depth) * attn + dense_blocks * 3 * d * model.d_ff
    dense += moe_blocks * (d * e.num_experts + 3 * d * e.d_ff * e.num_shared_experts) + model.mtp_depth * 2 * d * d
    experts = moe_blocks * e.num_experts * 3 * d * e.d_ff
    embed = model.vocab_size * d * (1 if model.tie_embeddings else 2)
    return dense, experts, embed
