"""The typed configuration schema: one small frozen dataclass per component.

A preset (``moela/configs/presets/<name>.py``) builds a :class:`Config` in ``get_config()``; the
command line changes single fields with ``--set section.field=value`` (see ``configs.loader``).
Every field is checked for type and every cross-field rule in ``configs.validate`` before
any compute, so a mistake fails with one message naming the key.

What a model *is* and how it is *computed* are apart: ``model`` is the checkpoint's identity
(shapes, vocabulary, routing), ``runtime`` is how this process computes it (kernel backends,
expert dispatch, remat). A checkpoint resumes or serves under any ``runtime``.

Each layer receives only its own section: attention layers get :class:`AttentionConfig`
and :class:`RopeConfig`, MoE layers get :class:`MoEConfig`, and what all layers share
(width, dtypes, init scale, norm epsilon) travels as :class:`LayerContext`, derived from
:class:`ModelConfig` rather than stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding; ``scaling="yarn"`` is DeepSeek-V2/V3's YaRN.

    ``mscale``/``mscale_all_dim`` follow DeepSeek's definition: cos/sin are multiplied by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the softmax scale by
    mscale(factor, mscale_all_dim)**2 (when ``mscale_all_dim`` is non-zero).
    """

    theta: float = 10000.0
    scaling: Literal["none", "yarn"] = "none"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # YaRN: round the correction range to whole dimensions


@dataclass(frozen=True)
class AttentionConfig:
    """Self-attention. ``kind="mla"`` is Multi-head Latent Attention; ``"gqa"`` is grouped
    query attention (``num_kv_heads=1`` is MQA) kept for ablations."""

    kind: Literal["mla", "gqa"] = "mla"
    num_heads: int = 4
    # MLA
    q_lora_rank: int = 0  # 0: queries are projected directly from the residual stream
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # GQA
    num_kv_heads: int = 4
    head_dim: int = 16

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def out_head_dim(self) -> int:
        return self.v_head_dim if self.kind == "mla" else self.head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek MoE: routed experts (top-k over group-limited scores) plus shared experts.

    ``num_experts=0`` makes every layer dense. Selection uses scores + the
    aux-loss-free correction bias; combine weights use the unbiased scores.
    ``group_score`` is how a group is ranked: DeepSeek-V3 sums its top-2 (biased)
    scores, DeepSeek-V2 takes the maximum.
    """

    num_experts: int = 0
    experts_per_token: int = 2
    num_shared_experts: int = 1
    d_ff: int = 64
    n_group: int = 1
    topk_group: int = 1
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step (training)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (alpha)


@dataclass(frozen=True)
class LayerContext:
    """What every layer shares; derived from :class:`ModelConfig` (``ModelConfig.ctx``)."""

    d_model: int
    param_dtype: DType
    compute_dtype: DType
    init_std: float
    norm_eps: float


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    first_k_dense: int = 1  # the first k layers use the dense MLP, the rest MoE
    d_ff: int = 128  # dense MLP hidden size
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    max_seq_len: int = 256
    # Multi-token prediction (DeepSeek-V3 sec. 2.2): D sequential modules after the last layer, each
    # one decoder block (MoE when the model has experts) predicting one token further ahead; 0 = off.
    mtp_depth: int = 0
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def ctx(self) -> LayerContext:
        return LayerContext(self.d_model, self.param_dtype, self.compute_dtype, self.init_std, self.norm_eps)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers if self.moe.num_experts == 0 else self.first_k_dense

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process computes the model; nothing here changes a parameter. Each op with several
    implementations names its backend (the registries in ``moela.kernels``: ``auto`` is the Pallas
    kernel on TPU/GPU and the XLA formulation on CPU):

    * ``attention``: training and prefill attention (``kernels.ATTENTION``): ``xla`` (plain XLA ops,
      flash-style backward), ``pallas`` (Mosaic on TPU, Triton on GPU), ``interpret`` /
      ``interpret_gpu`` (the TPU / GPU kernel through the Pallas interpreter: CPU tests),
      ``reference`` (the definition).
    * ``paged_attention``: serving's ragged paged attention (``kernels.paged.PAGED``), same names.
    * ``grouped_matmul``: the routed experts' grouped matmul (``kernels.grouped.GROUPED``):
      ``ragged_dot`` (``jax.lax.ragged_dot``) or ``blocked`` (a loop over blocks of
      ``grouped_block_rows`` rows, the CPU path).
    * ``expert_dispatch``: how expert parallelism brings tokens to experts
      (``parallel.experts.DISPATCH``): ``ring`` (tokens tour the devices), ``gather`` (all-gather,
      reduce-scatter) or ``all_to_all`` (each routed pair to its expert's device and back: ragged on
      TPU/GPU, padded to a fixed number of rows per peer on CPU). ``auto``: ``all_to_all`` on TPU
      and GPU, ``ring`` on CPU (where the step-time model puts each faster: docs/step_time.md).
    * ``expert_capacity``: the ``all_to_all`` buffers' size, a multiple of the average load. 0: the
      worst case, dropless (the ragged receive buffer then holds n·M·min(k, E/n) rows of D for n
      devices of M token rows each, k of E experts a token; the padded one M·min(k, E/n) per peer,
      n times that in all, sent and received); c > 0: c·M·k received rows (ragged), c·M·k/n per
      peer (padded), rounded up to 8.
      Pairs that do not fit are dropped (zero contribution) and counted (``moe_dropped_pairs``).
    * ``remat``: the rematerialisation policy of each scanned layer.
    """

    attention: Literal["auto", "xla", "reference", "pallas", "interpret", "interpret_gpu"] = "auto"
    paged_attention: Literal["auto", "xla", "reference", "pallas", "interpret", "interpret_gpu"] = "auto"
    grouped_matmul: Literal["auto", "ragged_dot", "blocked"] = "auto"
    grouped_block_rows: int = 128
    expert_dispatch: Literal["auto", "ring", "gather", "all_to_all"] = "auto"
    expert_capacity: float = 0.0
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1 means "all remaining devices") and the sharding strategy: the
    table of logical-axis rules (``parallel.rules``) that places parameters and activations."""

    data: int = -1
    tensor: int = 1
    sequence: int = 1
    strategy: Literal["dp", "fsdp", "tp", "ep_tp", "dp_tp_sp", "fsdp_tp_sp"] = "dp"  # parallel.rules.STRATEGIES


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 100
    global_batch_size: int = 8
    seq_len: int = 128
    microbatches: int = 1
    learning_rate: float = 3e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0
    z_loss: float = 0.0
    mtp_loss_weight: float = 0.3  # lambda: loss = main CE + lambda * mean over depths of the MTP CEs
    loss_chunk_tokens: int = 1024  # rows of logits formed at once by the chunked output-layer loss
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    keep_best: bool = False  # also keep the checkpoint with the lowest eval loss
    async_checkpoints: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = from the device table (CPU: measured)
    log_every: int = 10
    out_dir: str = "runs/default"


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is streamed (``moela.data``).

    A source is ``moela_text`` (local text files, ``text_glob``), a tfds dataset prepared as
    array_record under ``data_dir`` (``lm1b``, ``c4/en``), or files by glob:
    ``jsonl:/data/web/{split}-*.jsonl`` or ``array_record:/data/{split}/*.array_record``
    (``{split}`` becomes the split's name). ``mixture`` (``"SOURCE:WEIGHT, SOURCE:WEIGHT"``)
    replaces ``dataset`` with several weighted sources."""

    dataset: str = "moela_text"  # one source (see above)
    mixture: str = ""  # "lm1b:0.3, jsonl:/data/{split}-*.jsonl:0.7"; empty: dataset alone
    text_field: str = "text"
    data_dir: str = ""  # tfds data dir; empty: ~/tensorflow_datasets
    text_glob: str = ""  # moela_text source files; empty: the running Python's stdlib
    tokenizer_model: str = ""  # a sentencepiece .model; empty: train one on a sample of the train split
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    tokenizer_sentences: int = 200_000  # lines sampled (shuffled records) to train a tokenizer
    validation_split: str = "validation"
    max_documents: int = 0  # read at most the first N records of each source and split; 0 = all
    shards: int = 0  # record shards (independent streams) of the global batch; 0 = one per process
    workers: int = 0  # tokenising worker processes per shard; 0 = threads in the training process
    prefetch: int = 64  # documents read ahead per shard (per worker with workers > 0)
    shuffle_rows: int = 1024  # shuffle packed rows within windows of this many rows; 0 = off


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """``"lm1b:0.3, c4/en:0.7"`` -> [("lm1b", 0.3), ("c4/en", 0.7)] (weight after the last colon)."""
    entries = []
    for part in text.split(","):
        spec, sep, weight = part.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not sep or not spec.strip() or not (value > 0 and value < float("inf")):
            raise ValueError(
                f"mixture entry '{part.strip()}' must be SOURCE:WEIGHT with a positive weight "
                "(e.g. 'lm1b:0.3, c4/en:0.7')"
            )
        entries.append((spec.strip(), value))
    return entries


@dataclass(frozen=True)
class ServeConfig:
    """Batch generation (``serve.py``, ``inference``). The cache holds ``num_pages`` pages of
    ``page_size`` tokens shared by all running sequences; each engine step runs at most
    ``max_batch`` sequences and ``max_batched_tokens`` tokens (decode tokens first, then prefill
    chunks). Sampling fields are the defaults a request may override."""

    page_size: int = 16
    num_pages: int = 256
    max_batch: int = 8
    max_batched_tokens: int = 256
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int = -1  # -1: the tokenizer's end-of-sequence id (none without a tokenizer)
    cache_dtype: DType = "float32"
    # Speculative decoding with the model's MTP module as the draft: tokens drafted per sequence and
    # step, verified by one forward of the model (0 = off; needs model.mtp_depth >= 1).
    speculative_tokens: int = 0


@dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
