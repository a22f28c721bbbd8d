"""How this process computes the model, passed explicitly to every forward.

What a model *is* (its ``ModelConfig`` and parameters) is apart from how it is *computed*:
which kernel backends run (the ``runtime`` config section) and how the work is spread over
devices (a :class:`Partitioner`). Both travel in a :class:`Runtime` argument, never in the
modules or in ambient state, so one set of parameters trains, resumes and serves under any
runtime, and a reader sees at each call what it runs under::

    logits, aux = model(tokens, rt=Runtime(cfg.runtime, layout))

:class:`Partitioner` is the narrow hook between the model and the mesh. The model names logical
axes and asks the partitioner to constrain activations, lay a sequence out for ring attention,
and run the two kinds of work that need explicit collectives on a mesh (attention split over the
sequence or over heads, routed experts split over devices). This base class answers for one
device: every hook is the plain op. ``moela.parallel.layout.Layout`` answers for a mesh. The
model never imports ``parallel``: the dependency points up only through this interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from moela import kernels
from moela.configs.schema import RuntimeConfig
from moela.kernels import grouped, paged


class Partitioner:
    """The one-device answers to what the model asks of its devices; see the module docstring."""

    def constrain(self, x, names: tuple[str | None, ...]):
        """``x`` with its dims placed by logical name (``("batch", "length", "act_embed")``)."""
        return x

    def size(self, name: str) -> int:
        """How many devices logical axis ``name`` is split over (1: not split)."""
        return 1

    def sequence_order(self, length: int) -> np.ndarray | None:
        """The order in which a sequence of ``length`` positions is laid out over the devices
        (a permutation of ``range(length)``), or None for the natural order."""
        return None

    def attention(self, q_bthk, k_bsgk, v_bsgv, segment_ids_bt, *, scale: float, backend: str, kv_heads: str):
        """Causal self-attention out [B, T, H, V] (``kernels.attention``); ``kv_heads`` is the
        logical name of k/v's head axis (MLA's expanded heads are ``act_heads``)."""
        return kernels.attention(
            q_bthk,
            k_bsgk,
            v_bsgv,
            scale=scale,
            causal=True,
            q_segment_ids=segment_ids_bt,
            kv_segment_ids=segment_ids_bt,
            backend=backend,
        )[0]

    def paged_attention(self, q_thk, cache, layer, *, scale: float, fmt: paged.RowFormat, backend: str):
        """Attention of packed queries over the paged cache (``kernels.paged.ragged_paged_attention``)."""
        return paged.ragged_paged_attention(
            q_thk,
            cache.pool,
            cache.kv_lens,
            cache.page_table,
            cache.cu_q_lens,
            cache.num_seqs,
            layer,
            scale=scale,
            fmt=fmt,
            backend=backend,
        )

    def routed_experts(self, x, weights, ids, w_gate_edf, w_up_edf, w_down_efd, *, runtime: RuntimeConfig):
        """Routed experts (``kernels.grouped.routed_swiglu``): (y [..., D] of x [..., D], the number of
        (token, expert) pairs dropped, int32 []). One device is dropless: 0."""
        y = grouped.routed_swiglu(
            x,
            weights,
            ids,
            w_gate_edf,
            w_up_edf,
            w_down_efd,
            backend=runtime.grouped_matmul,
            block=runtime.grouped_block_rows,
        )
        return y, jnp.zeros((), jnp.int32)

    def sharding(self, names: tuple[str | None, ...]) -> Any | None:
        """Where an array with these logical axes lives (a ``jax.sharding.Sharding``), or None: on
        this process's first device."""
        return None

    def shardings(self, abstract_state) -> Any | None:
        """Where each variable of a model state lives (a tree of shardings like the state), or
        None: on this process's first device."""
        return None


ONE_DEVICE = Partitioner()


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The ``runtime`` config section and the partitioner: everything a forward needs that is not
    the model itself. Hashable, so jitted functions can close over it."""

    config: RuntimeConfig = RuntimeConfig()
    partitioner: Partitioner = ONE_DEVICE

    def constrain(self, x, names: tuple[str | None, ...]):
        return self.partitioner.constrain(x, names)
