"""Logits of a moela checkpoint for given tokens: the tool to compare moela with another implementation.

    python -m moela.model.logits --checkpoint DIR --tokens IN.npy --out OUT.npy [--batch-size N]

IN.npy is int32/int64 [B, T] token ids; OUT.npy is float32 [B, T, V]. DIR is anything
``model.hf_import`` or ``train.py`` writes (the latest step is used unless ``--step``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moela.model.checkpoint import CheckpointError, load_model


def compute_logits(model, tokens_bt: np.ndarray, batch_size: int = 8) -> np.ndarray:
    forward = nnx.jit(lambda m, t: m(t)[0])
    out = [
        np.asarray(forward(model, jnp.asarray(tokens_bt[i : i + batch_size], jnp.int32)))
        for i in range(0, len(tokens_bt), batch_size)
    ]
    return np.concatenate(out, axis=0).astype(np.float32)


def read_tokens(path: Path, vocab_size: int, max_len: int) -> np.ndarray:
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokens from '{path}': {e}") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"'{path}' must hold an integer array [batch, time]; got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids in '{path}' must lie in [0, {vocab_size}); found {tokens.min()}..{tokens.max()}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequence length {tokens.shape[1]} in '{path}' exceeds the model's max_seq_len {max_len}")
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moela.model.logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="moela checkpoint dir")
    parser.add_argument("--tokens", required=True, type=Path, help="int [B, T] .npy")
    parser.add_argument("--out", required=True, type=Path, help="float32 [B, T, V] .npy to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        cfg, model = load_model(args.checkpoint, args.step)
        tokens = read_tokens(args.tokens, cfg.model.vocab_size, cfg.model.max_seq_len)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logits = compute_logits(model, tokens, args.batch_size)
    np.save(args.out, logits)
    print(f"wrote {args.out}: logits {logits.shape} float32 on {jax.default_backend()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
