"""What every kernel shares: the masking constant, integer rounding, TPU tile sizes and the
choice of a block size. One definition each, so the kernels cannot drift apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A masked logit. Finite, so a row whose block is all masked never forms inf - inf (NaN) in the
# online softmax; exp(NEG_INF - m) underflows to 0 for any real running max m.
NEG_INF = -1e30

LANES, SUBLANES = 128, 8  # a TPU vector register: 8 sublanes x 128 lanes (float32)
NT_DIMS = (((1,), (1,)), ((), ()))  # dot_general dimension numbers of a @ b.T (contract the last dims)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x``."""
    return cdiv(x, m) * m


def pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= ``n`` (and >= ``floor``)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def is_pow2(n) -> bool:
    return isinstance(n, int) and n >= 1 and not n & (n - 1)


def div(x, d: int):
    """Floor division of a non-negative traced int32 by a constant (a plain ``//`` lowers through
    ``sign`` in Mosaic)."""
    return jax.lax.div(x, jnp.int32(d))


def lanes(x_r128, n: int):
    """A lane-replicated [r, 128] array (every lane holds the row's value) as [r, n]."""
    if n <= LANES:
        return x_r128[:, :n]
    if n % LANES == 0:
        return jnp.tile(x_r128, (1, n // LANES))
    return jnp.broadcast_to(x_r128[:, :1], (x_r128.shape[0], n))


def lane_aligned(d: int) -> int:
    """A head dim as a TPU kernel holds it: dims above one lane tile are padded to whole tiles
    (192 -> 256); shorter ones stay (a block dim equal to the array dim needs no padding)."""
    return d if d <= LANES else round_up(d, LANES)


def fit_block(n: int, block: int, align: int) -> int:
    """The block size for an axis of ``n`` rows: ``block``, or one block covering all ``n`` rows
    when that is shorter, rounded up to ``align`` (to whole lanes above 128 rows, so row vectors
    of the block still tile by lanes)."""
    return min(block, round_up(n, align if n <= LANES else LANES))
