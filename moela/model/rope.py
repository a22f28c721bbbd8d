"""Rotary position embeddings, with DeepSeek-V2/V3's YaRN context extension.

We rotate in the half-split layout (pairs are (i, i + P/2)). Checkpoints that rotate
adjacent pairs (DeepSeek's "interleaved" rope) are permuted once at import time
(``model.hf_import``), which leaves every attention score unchanged.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from moela.configs.schema import RopeConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """[P/2] float32 inverse frequencies; YaRN blends interpolated and original ones."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    extrapolated = (1.0 / pos_freqs).astype(np.float32)
    if rope.scaling == "none":
        return extrapolated
    interpolated = (1.0 / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep_original = 1.0 - ramp
    return (interpolated * (1 - keep_original) + extrapolated * keep_original).astype(np.float32)


def cos_sin_scale(rope: RopeConfig) -> float:
    """YaRN's multiplier on cos/sin ("attention factor")."""
    if rope.scaling == "none":
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """1/sqrt(K), times mscale(factor, mscale_all_dim)**2 under YaRN (DeepSeek's correction)."""
    scale = qk_head_dim**-0.5
    if rope.scaling == "yarn" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class Rotary:
    """Precomputed rotary frequencies for one rotary dimension; stateless, not a parameter."""

    def __init__(self, rope: RopeConfig, dim: int):
        self.inv_freq = inv_frequencies(rope, dim)
        self.scale = cos_sin_scale(rope)

    def tables(self, positions_bt):
        """cos, sin [B, T, P/2] float32 for integer positions [B, T]."""
        angles_btp = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq)
        return jnp.cos(angles_btp) * self.scale, jnp.sin(angles_btp) * self.scale

    @staticmethod
    def apply(x, cos_btp, sin_btp):
        """Rotate x [B, T, ..., P] (any head axes between T and P) in the half-split layout."""
        extra = x.ndim - 3
        cos = cos_btp.reshape(cos_btp.shape[:2] + (1,) * extra + cos_btp.shape[-1:])
        sin = sin_btp.reshape(sin_btp.shape[:2] + (1,) * extra + sin_btp.shape[-1:])
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x.dtype)
