"""Building blocks: the ``param`` helper, RMSNorm, SwiGLU, embedding and LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import LayerContext

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype(name: str):
    return DTYPES[name]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype_name: str) -> nnx.Param:
    """A truncated-normal (±2σ) parameter with its logical axis names attached as sharding metadata."""
    assert len(shape) == len(axes), (shape, axes)
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype(dtype_name)), out_sharding=axes, eager_sharding=False)


def ones_param(shape: tuple[int, ...], axes: tuple[str, ...], dtype_name: str) -> nnx.Param:
    """A parameter initialised to ones (norm scales), with logical axis names."""
    return nnx.Param(jnp.ones(shape, dtype(dtype_name)), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and returned in the input dtype."""

    def __init__(self, dim: int, ctx: LayerContext, *, axis_name: str = "norm", rngs: nnx.Rngs):
        del rngs  # deterministic init; the argument keeps every layer's constructor alike
        self.scale = ones_param((dim,), (axis_name,), ctx.param_dtype)
        self.eps = ctx.norm_eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """Gated feed-forward: (silu(x·W_gate) ⊙ x·W_up)·W_down."""

    def __init__(self, d_ff: int, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, std, pd = ctx.d_model, ctx.init_std, ctx.param_dtype
        self.w_gate = param(rngs, (d, d_ff), ("embed", "mlp"), std, pd)
        self.w_up = param(rngs, (d, d_ff), ("embed", "mlp"), std, pd)
        self.w_down = param(rngs, (d_ff, d), ("mlp", "embed"), std, pd)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def __call__(self, x_btd):
        cd = self.compute_dtype
        x_btd = x_btd.astype(cd)
        h_btf = jax.nn.silu(jnp.einsum("btd,df->btf", x_btd, self.w_gate[...].astype(cd)))
        h_btf = h_btf * jnp.einsum("btd,df->btf", x_btd, self.w_up[...].astype(cd))
        return jnp.einsum("btf,fd->btd", h_btf, self.w_down[...].astype(cd))


class Embed(nnx.Module):
    """Token embedding; ``attend`` reuses the table as a tied LM head."""

    def __init__(self, vocab: int, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.table = param(rngs, (vocab, ctx.d_model), ("vocab", "embed"), ctx.init_std, ctx.param_dtype)
        self.compute_dtype = dtype(ctx.compute_dtype)

    def __call__(self, tokens_bt):
        return jnp.take(self.table[...], tokens_bt, axis=0).astype(self.compute_dtype)

    def attend(self, x_btd):
        return jnp.einsum("btd,nd->btn", x_btd, self.table[...].astype(x_btd.dtype),
                          preferred_element_type=jnp.float32)


class LMHead(nnx.Module):
    """Untied output projection; logits are float32."""

    def __init__(self, vocab: int, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.w = param(rngs, (ctx.d_model, vocab), ("embed", "vocab"), ctx.init_std, ctx.param_dtype)

    def __call__(self, x_btd):
        return jnp.einsum("btd,dn->btn", x_btd, self.w[...].astype(x_btd.dtype),
                          preferred_element_type=jnp.float32)
