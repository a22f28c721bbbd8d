"""Import a Hugging Face DeepSeek-V2/V3 checkpoint into a moela checkpoint directory.

    python -m moela.model.hf_import SRC_DIR OUT_DIR [--dtype float32|bfloat16]

SRC_DIR holds ``config.json`` and ``*.safetensors`` shards (float32, bfloat16, or
DeepSeek-V3's block-scaled float8 with ``weight_scale_inv``). Tensors stream one at a time
from memory-mapped shards straight into their slot of the stacked moela layout, so the
host holds the converted model once and never a second copy. Multi-token-prediction layers
(``model.layers.{num_hidden_layers + k}``, ``num_nextn_predict_layers`` of them) become
``model.mtp_depth`` MTP modules (``model.mtp``): ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm``
and the decoder block; their copies of the embedding and the output head must equal the main
model's, which moela shares (``--no-mtp`` leaves the modules out). An unsupported config is
refused with the key and the supported values before anything is read.

Conventions bridged here: HF weights are [out, in], moela's [in, out] with heads split out;
``kv_a_proj_with_mqa`` is [latent | k_pe]; ``kv_b_proj`` is per head [k_nope | v]; HF's
interleaved rope (adjacent pairs) is turned into moela's half-split rope by permuting the
rope rows of q and k_pe, which leaves every attention score unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from moela.configs.schema import AttentionConfig, Config, ModelConfig, MoEConfig, RopeConfig
from moela.configs.validate import validate
from moela.model.checkpoint import save_params
from moela.model.layers import DTYPES
from moela.model.safetensors_io import SafetensorsFile, checkpoint_files
from moela.model.transformer import abstract_model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class UnsupportedCheckpoint(ValueError):
    pass


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UnsupportedCheckpoint(message)


def rope_from_hf(hf: dict) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return RopeConfig(theta=theta)
    _need(kind == "yarn", f"rope type {kind!r} is not supported; supported: default, yarn")
    return RopeConfig(
        theta=theta,
        scaling="yarn",
        factor=float(params["factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        truncate=bool(params.get("truncate", True)),
    )


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """transformers' ``DeepseekV3Config`` arguments for a moela model of plain RoPE (the inverse of
    ``config_from_hf`` on what the benchmarks build: the same shapes, run by both)."""
    a, e = cfg.attention, cfg.moe
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        moe_intermediate_size=e.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads,
        n_shared_experts=e.num_shared_experts,
        n_routed_experts=e.num_experts,
        kv_lora_rank=a.kv_lora_rank,
        q_lora_rank=a.q_lora_rank or None,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        qk_nope_head_dim=a.qk_nope_head_dim,
        n_group=e.n_group,
        topk_group=e.topk_group,
        num_experts_per_tok=e.experts_per_token,
        first_k_dense_replace=cfg.first_k_dense,
        routed_scaling_factor=e.routed_scaling_factor,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope.theta},
    )


def config_from_hf(hf: dict, dtype: str | None = None, mtp_depth: int | None = None) -> ModelConfig:
    """A moela ModelConfig equal to a HF DeepSeek-V2/V3 ``config.json``; refuses what it cannot map.
    ``mtp_depth`` overrides ``num_nextn_predict_layers`` (e.g. 0 for a checkpoint without them)."""
    model_type = hf.get("model_type")
    _need(
        model_type in ("deepseek_v2", "deepseek_v3"),
        f"config.json model_type {model_type!r} is not supported; supported: deepseek_v2, deepseek_v3",
    )
    v3 = model_type == "deepseek_v3"
    _need(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} unsupported; supported: silu")
    _need(not hf.get("attention_bias", False), "attention_bias=true is unsupported; supported: false")
    _need(not hf.get("mlp_bias", False), "mlp_bias=true is unsupported; supported: false")
    _need(hf.get("moe_layer_freq", 1) == 1, f"moe_layer_freq {hf.get('moe_layer_freq')} unsupported; supported: 1")
    scoring = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
    _need(scoring in ("sigmoid", "softmax"), f"scoring_func {scoring!r} unsupported; supported: sigmoid, softmax")
    topk_method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    _need(
        topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
        f"topk_method {topk_method!r} unsupported; supported: noaux_tc, greedy, group_limited_greedy",
    )
    quant = hf.get("quantization_config")
    if quant:
        _need(
            quant.get("quant_method") == "fp8" and list(quant.get("weight_block_size", [])) == [128, 128],
            f"quantization_config {quant} unsupported; supported: fp8 with weight_block_size [128, 128]",
        )
    n_experts = int(hf.get("n_routed_experts") or 0)
    n_group = int(hf.get("n_group") or 1) if topk_method != "greedy" else 1
    topk_group = int(hf.get("topk_group") or 1) if topk_method != "greedy" else 1
    if dtype is None:
        stored = str(hf.get("torch_dtype", hf.get("dtype")))
        dtype = "bfloat16" if stored in ("bfloat16", "float8_e4m3fn") else "float32"
    model = ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        first_k_dense=min(int(hf.get("first_k_dense_replace") or 0), int(hf["num_hidden_layers"])),
        d_ff=int(hf["intermediate_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        param_dtype=dtype,
        compute_dtype=dtype,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        mtp_depth=int(hf.get("num_nextn_predict_layers") or 0) if mtp_depth is None else mtp_depth,
        attention=AttentionConfig(
            kind="mla",
            num_heads=int(hf["num_attention_heads"]),
            q_lora_rank=int(hf.get("q_lora_rank") or 0),
            kv_lora_rank=int(hf["kv_lora_rank"]),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
        ),
        rope=rope_from_hf(hf),
        moe=MoEConfig(
            num_experts=n_experts,
            experts_per_token=int(hf.get("num_experts_per_tok") or 1),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            d_ff=int(hf.get("moe_intermediate_size") or 1),
            n_group=n_group,
            topk_group=topk_group,
            score_func=scoring,
            group_score="top2_sum" if v3 else "max",
            # HF's DeepSeek-V2 never renormalises the top-k weights; V3 follows the flag.
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)) if v3 else False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        ),
    )
    try:
        validate(Config(name=f"hf-{model_type}", model=model))
    except ValueError as e:
        raise UnsupportedCheckpoint(f"config.json maps to an invalid moela config: {e}") from None
    return model


def rope_permutation(p: int) -> np.ndarray:
    """Rows [0, 2, 4, ..., 1, 3, 5, ...]: interleaved pairs -> half-split pairs."""
    return np.concatenate([np.arange(0, p, 2), np.arange(1, p, 2)])


def _dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
    """DeepSeek-V3 fp8: each [128, 128] block of ``w`` is multiplied by its ``weight_scale_inv`` entry."""
    rows, cols = w.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:rows, :cols]
    return w.astype(np.float32) * scale


def _heads(w: np.ndarray, h: int) -> np.ndarray:
    """[H*k, in] -> [in, H, k]."""
    return w.T.reshape(w.shape[1], h, -1)


def _q(w: np.ndarray, cfg: ModelConfig, interleaved: bool) -> np.ndarray:
    a = cfg.attention
    q = _heads(w, a.num_heads)
    if interleaved:
        nope = a.qk_nope_head_dim
        perm = np.concatenate([np.arange(nope), nope + rope_permutation(a.qk_rope_head_dim)])
        q = q[..., perm]
    return q


def _kv_a(w: np.ndarray, cfg: ModelConfig, interleaved: bool) -> dict[str, np.ndarray]:
    r = cfg.attention.kv_lora_rank
    k_pe = w[r:]
    if interleaved:
        k_pe = k_pe[rope_permutation(k_pe.shape[0])]
    return {"attn.wkv_a": w[:r].T, "attn.wk_pe": k_pe.T}


def _kv_b(w: np.ndarray, cfg: ModelConfig) -> dict[str, np.ndarray]:
    kv = _heads(w, cfg.attention.num_heads)
    nope = cfg.attention.qk_nope_head_dim
    return {"attn.w_uk": kv[..., :nope], "attn.w_uv": kv[..., nope:]}


def block_rules(interleaved: bool) -> list[tuple[re.Pattern, Callable | None]]:
    """(HF name under ``model.layers.i.``, fn(W, cfg) -> {moela path under the block: array}).

    ``None`` marks names whose target depends on the match (MLP and expert projections).
    """
    t = lambda path: lambda w, cfg: {path: w.T}  # noqa: E731
    rules = [
        (r"input_layernorm\.weight", lambda w, cfg: {"attn_norm.scale": w}),
        (r"post_attention_layernorm\.weight", lambda w, cfg: {"ffn_norm.scale": w}),
        (r"self_attn\.q_proj\.weight", lambda w, cfg: {"attn.wq": _q(w, cfg, interleaved)}),
        (r"self_attn\.q_a_proj\.weight", t("attn.wq_a")),
        (r"self_attn\.q_a_layernorm\.weight", lambda w, cfg: {"attn.q_norm.scale": w}),
        (r"self_attn\.q_b_proj\.weight", lambda w, cfg: {"attn.wq_b": _q(w, cfg, interleaved)}),
        (r"self_attn\.kv_a_proj_with_mqa\.weight", lambda w, cfg: _kv_a(w, cfg, interleaved)),
        (r"self_attn\.kv_a_layernorm\.weight", lambda w, cfg: {"attn.kv_norm.scale": w}),
        (r"self_attn\.kv_b_proj\.weight", _kv_b),
        (
            r"self_attn\.o_proj\.weight",
            lambda w, cfg: {"attn.wo": w.T.reshape(cfg.attention.num_heads, -1, w.shape[0])},
        ),
        (r"mlp\.(gate|up|down)_proj\.weight", None),  # dense MLP, handled by name below
        (r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", None),
        (r"mlp\.gate\.weight", t("ffn.router.w")),
        (r"mlp\.gate\.e_score_correction_bias", lambda w, cfg: {"ffn.router.bias": w}),
        (r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", None),  # one expert: a slice of the stack
        (r"mlp\.experts\.gate_up_proj", None),  # fused [E, 2F, D]
        (r"mlp\.experts\.down_proj", None),  # fused [E, D, F]
    ]
    return [(re.compile(p + "$"), fn) for p, fn in rules]


class Importer:
    """Fills a pure-dict copy of the moela state, tensor by tensor, tracking what is still missing."""

    def __init__(self, cfg: ModelConfig, interleaved: bool):
        self.cfg = cfg
        self.rules = block_rules(interleaved)
        self.tree = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
        self.targets: dict[str, tuple[dict, str]] = {}  # dotted path -> (parent dict, key)
        self._index(self.tree, "")
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}
        self.skipped: list[str] = []
        self.digests: dict[str, int] = {}  # the main embedding and head, and the MTP layers' copies

    def _index(self, tree: dict, prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, dict):
                self._index(v, f"{prefix}{k}.")
            else:
                self.targets[f"{prefix}{k}"] = (tree, k)

    def _spec(self, path: str):
        parent, key = self.targets[path]
        return parent[key]

    def _slot(self, path: str) -> np.ndarray:
        if path not in self.arrays:
            spec = self._spec(path)
            self.arrays[path] = np.zeros(spec.shape, spec.dtype)
        return self.arrays[path]

    def put(self, path: str, value: np.ndarray, index: tuple = ()) -> None:
        if path not in self.targets:
            raise UnsupportedCheckpoint(f"moela has no parameter '{path}' (config mismatch?)")
        slot = self._slot(path)
        expected = slot[index].shape
        if tuple(value.shape) != expected:
            raise UnsupportedCheckpoint(
                f"shape mismatch for '{path}{list(index)}': checkpoint {value.shape}, moela expects {expected}"
            )
        slot[index] = value.astype(slot.dtype)
        self.filled[path] = self.filled.get(path, 0) + int(np.prod(value.shape))

    def add(self, name: str, w: np.ndarray) -> None:
        cfg = self.cfg
        top = {
            "model.embed_tokens.weight": ("embed.table", lambda w: w),
            "model.norm.weight": ("final_norm.scale", lambda w: w),
            "lm_head.weight": ("lm_head.w", lambda w: w.T),
        }
        if name in top:
            if name != "model.norm.weight":
                self.digests[name] = digest(w)
            if name == "lm_head.weight" and cfg.tie_embeddings:
                return
            path, fn = top[name]
            return self.put(path, fn(w))
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            self.skipped.append(name)
            return
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= cfg.num_layers:
            return self._mtp(name, layer - cfg.num_layers, rest, w)
        dense = layer < cfg.num_dense_layers
        group, li = ("dense_blocks", layer) if dense else ("moe_blocks", layer - cfg.num_dense_layers)
        self._block(name, group, (li,), rest, w)

    def _mtp(self, name: str, depth: int, rest: str, w: np.ndarray) -> None:
        """A multi-token-prediction layer's tensor (``num_hidden_layers + depth``)."""
        if depth >= self.cfg.mtp_depth:
            self.skipped.append(name)
            return
        own = {
            "enorm.weight": ("embed_norm.scale", lambda w: w),
            "hnorm.weight": ("hidden_norm.scale", lambda w: w),
            "eh_proj.weight": ("proj", lambda w: w.T),  # [D, 2D] over [emb; hidden] -> [2D, D]
            "shared_head.norm.weight": ("final_norm.scale", lambda w: w),
        }
        shared = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
        if rest in own:
            path, fn = own[rest]
            return self.put(f"mtp.{depth}.{path}", fn(w))
        if rest in shared:  # a copy of the main model's: checked in ``finish``
            self.digests[name] = digest(w)
            return
        self._block(name, f"mtp.{depth}.block", (), rest, w)

    def _block(self, name: str, group: str, index: tuple, rest: str, w: np.ndarray) -> None:
        """One decoder block's tensor into ``group`` (a stack: ``index`` = (layer,); an MTP block: ())."""
        cfg = self.cfg
        for pattern, fn in self.rules:
            mm = pattern.match(rest)
            if not mm:
                continue
            if fn is not None:
                for sub, value in fn(w, cfg).items():
                    self.put(f"{group}.{sub}", value, index)
            elif rest.startswith("mlp.experts."):
                self._experts(group, index, rest, mm, w)
            else:
                which = mm.group(1)
                owner = "ffn.shared" if "shared_experts" in rest else "ffn"
                self.put(f"{group}.{owner}.w_{which}", w.T, index)
            return
        raise UnsupportedCheckpoint(f"unrecognised tensor '{name}' in the checkpoint")

    def _experts(self, group: str, index: tuple, rest: str, mm: re.Match, w: np.ndarray) -> None:
        base = f"{group}.ffn.experts"
        if rest.endswith("gate_up_proj"):
            f = w.shape[1] // 2
            self.put(f"{base}.w_gate", w[:, :f].transpose(0, 2, 1), index)
            self.put(f"{base}.w_up", w[:, f:].transpose(0, 2, 1), index)
        elif rest.endswith("experts.down_proj"):
            self.put(f"{base}.w_down", w.transpose(0, 2, 1), index)
        else:
            self.put(f"{base}.w_{mm.group(2)}", w.T, index + (int(mm.group(1)),))

    def check_shared(self) -> None:
        """Each MTP layer's embedding and head must be the main model's (moela shares one of each)."""
        main = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
        if self.cfg.tie_embeddings:
            main["shared_head.head.weight"] = "model.embed_tokens.weight"
        for name, value in self.digests.items():
            m = re.match(r"model\.layers\.\d+\.(.+)$", name)
            if m and value != self.digests.get(main[m.group(1)]):
                raise UnsupportedCheckpoint(
                    f"'{name}' differs from the main model's '{main[m.group(1)]}'; moela's MTP modules share the "
                    "main embedding and head (import with --no-mtp to leave the MTP layers out)"
                )

    def finish(self) -> dict:
        """The filled pure-dict state; every tensor must have been written (router biases may default to 0)."""
        self.check_shared()
        missing = [
            p
            for p in self.targets
            if self.filled.get(p, 0) < int(np.prod(self._spec(p).shape)) and not p.endswith("router.bias")
        ]
        if missing:
            raise UnsupportedCheckpoint(f"the checkpoint lacks {len(missing)} moela tensors, e.g. {missing[:5]}")
        for path, (parent, key) in self.targets.items():
            parent[key] = self._slot(path)
        return self.tree


def digest(w: np.ndarray) -> tuple:
    """Shape, dtype and CRC-32 of an array's bytes: equal copies agree, without holding a second one."""
    return w.shape, str(w.dtype), zlib.crc32(memoryview(np.ascontiguousarray(w)).cast("B"))


def mtp_layers_present(src: Path, num_layers: int) -> int:
    """How many consecutive MTP layers (``model.layers.{num_layers + k}``) the shards hold (headers only)."""
    found = set()
    for f in checkpoint_files(src):
        for name in SafetensorsFile(f).keys():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m and int(m.group(1)) >= num_layers:
                found.add(int(m.group(1)) - num_layers)
    return next(k for k in range(len(found) + 1) if k not in found)


def iter_tensors(src: Path):
    """(name, float array) for every weight, shard by shard; fp8 weights are dequantised."""
    files = checkpoint_files(src)
    shards = {f: SafetensorsFile(f) for f in files}
    where = {name: f for f, s in shards.items() for name in s.keys()}
    for f in files:
        for name in shards[f].keys():
            if name.endswith("weight_scale_inv"):
                continue
            w = shards[f].get(name)
            if w.dtype in (np.dtype("float8_e4m3fn"), np.dtype("float8_e5m2")):
                scale_name = name + "_scale_inv"
                if scale_name not in where:
                    raise UnsupportedCheckpoint(f"fp8 tensor '{name}' has no '{scale_name}'")
                w = _dequantize_fp8(w, shards[where[scale_name]].get(scale_name))
            yield name, w


def import_checkpoint(
    src: str | Path,
    out: str | Path,
    dtype: str | None = None,
    log=print,
    overwrite: bool = False,
    mtp: bool = True,
) -> Config:
    """Convert ``src`` into a moela checkpoint directory ``out``; ``mtp=False`` leaves the
    multi-token-prediction layers out (``model.mtp_depth`` 0)."""
    src, out = Path(src), Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise UnsupportedCheckpoint(
            f"'{out}' already holds a moela checkpoint; choose another OUT_DIR or pass --overwrite to replace it"
        )
    try:
        hf = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedCheckpoint(f"cannot read '{src / 'config.json'}': {e}") from None
    model_cfg = config_from_hf(hf, dtype, mtp_depth=None if mtp else 0)
    if model_cfg.mtp_depth:
        present = mtp_layers_present(src, model_cfg.num_layers)
        if present < model_cfg.mtp_depth:
            log(
                f"config.json names {model_cfg.mtp_depth} MTP layer(s) (num_nextn_predict_layers) but the shards hold "
                f"{present}: importing {present}"
            )
            model_cfg = dataclasses.replace(model_cfg, mtp_depth=present)
    cfg = Config(name=f"hf-{hf['model_type']}", model=model_cfg)
    interleaved = bool(hf.get("rope_interleave", True)) or hf["model_type"] == "deepseek_v2"
    importer = Importer(model_cfg, interleaved)
    start, count = time.time(), 0
    for name, w in iter_tensors(src):
        importer.add(name, w)
        count += 1
        if count % 200 == 0:
            log(f"  {count} tensors, {time.time() - start:.0f}s")
    tree = importer.finish()
    if importer.skipped:
        log(f"skipped {len(importer.skipped)} tensors not in the moela model (e.g. {importer.skipped[0]})")
    save_params(out, cfg, tree)
    for name in TOKENIZER_FILES:  # serve.py reads text prompts through them
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    log(f"imported {count} tensors from {src} into {out} in {time.time() - start:.1f}s")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.model.hf_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face checkpoint dir (config.json + *.safetensors)")
    parser.add_argument("out", help="moela checkpoint dir to write")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="parameter dtype (default: the checkpoint's: bfloat16 for bf16/fp8, else float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing moela checkpoint in OUT_DIR")
    parser.add_argument("--no-mtp", action="store_true", help="leave the multi-token-prediction layers out")
    args = parser.parse_args(argv)
    try:
        import_checkpoint(args.src, args.out, args.dtype, overwrite=args.overwrite, mtp=not args.no_mtp)
    except (UnsupportedCheckpoint, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
