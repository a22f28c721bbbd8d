"""Where a run's chips sit and how fast collectives cross them.

:class:`Parallelism` says how a run splits its work over chips (moela's strategies map onto it:
``moela_parallelism``; published runs state theirs directly). :class:`Network` turns one collective
over one of its axes into seconds from the chip's links (``planner.chips``).
"""

from __future__ import annotations

import dataclasses
import math

from moela.planner.chips import Chip


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How a run splits its work. Tokens are split over data·fsdp·expert·dcn_data (rows) and
    sequence (length); weights' D over fsdp; heads, d_ff (the experts' too) and vocab over tensor;
    routed experts over expert (dense weights are replicated over it). ``pipeline`` stages (``virtual`` per device)."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    sequence: int = 1
    pipeline: int = 1
    virtual: int = 1
    dcn_data: int = 1  # replicas across slices / nodes, reduced over the data-center network

    @property
    def chips(self) -> int:
        return self.data * self.fsdp * self.expert * self.tensor * self.sequence * self.pipeline * self.dcn_data

    @property
    def row_split(self) -> int:
        return self.data * self.fsdp * self.expert * self.dcn_data


def moela_parallelism(strategy: str, mesh: dict[str, int], has_experts: bool = True) -> Parallelism:
    """moela's strategies (``parallel.rules``) as a :class:`Parallelism`."""
    d, t, s = mesh.get("data", 1), mesh.get("tensor", 1), mesh.get("sequence", 1)
    return {
        "dp": Parallelism(data=d),
        "fsdp": Parallelism(fsdp=d),
        "tp": Parallelism(data=d, tensor=t),
        "ep_tp": Parallelism(expert=d, tensor=t) if has_experts else Parallelism(data=d, tensor=t),
        "dp_tp_sp": Parallelism(expert=d, tensor=t, sequence=s)
        if has_experts
        else Parallelism(data=d, tensor=t, sequence=s),
        "fsdp_tp_sp": Parallelism(fsdp=d, tensor=t, sequence=s),
    }[strategy]


@dataclasses.dataclass(frozen=True)
class Network:
    """Collective times over one mesh axis of a chip's network (module docstring of ``chips``).

    Torus (TPU ICI): the slice (every chip but ``dcn_data``) is a torus of ``torus_dims``
    dimensions of side N^(1/dims). An axis of n chips spans d = max(1, log n / log side)
    dimensions of side a = n^(1/d). All-gather / reduce-scatter of V bytes (the whole array):
    V·(n−1)/n over 2·d links each way; all-reduce twice that. All-to-all of V bytes per chip:
    every byte travels a/4 hops on average per dimension over 2·d links per chip, so
    V·a/(8·link_bw). Neighbour ``ppermute``: V over one link. Each adds ``latency`` per hop.

    Host (``cpu``: fake devices of one process): one "node" holding every device, ``link_bw`` its
    memory copy rate between devices.

    Switch (NVIDIA): axes are placed innermost first (tensor, sequence, expert, fsdp, data,
    pipeline); an axis whose chips fit in one NVLink node moves at NVLink speed, otherwise the
    part leaving a node goes through the NICs of the axis' g chips per node (one each)."""

    chip: Chip
    par: Parallelism

    def _torus(self, n: int):
        slice_chips = self.par.chips // self.par.dcn_data
        side = max(2.0, slice_chips ** (1 / self.chip.torus_dims))
        d = max(1.0, math.log(n) / math.log(side))
        return d, n ** (1 / d)

    def _inner(self, axis: str) -> int:
        order = ("tensor", "sequence", "expert", "fsdp", "data", "pipeline", "dcn_data")
        return math.prod(getattr(self.par, a) for a in order[: order.index(axis)])

    def time(self, kind: str, axis: str, nbytes: float) -> float:
        """Seconds for one collective ``kind`` (all_gather, reduce_scatter, all_reduce, all_to_all,
        ppermute) of ``nbytes`` (whole gathered array; per-chip payload for all_to_all/ppermute)."""
        n = getattr(self.par, axis)
        if n == 1 or nbytes == 0:
            return 0.0
        c = self.chip
        if kind == "all_reduce":
            return 2 * self.time("reduce_scatter", axis, nbytes)
        if c.network == "torus" and axis != "dcn_data":
            d, a = self._torus(n)
            hops = d * (a - 1)
            if kind in ("all_gather", "reduce_scatter"):
                return nbytes * (n - 1) / n / (2 * d * c.link_bw) + c.latency * hops
            if kind == "all_to_all":
                return nbytes * a / (8 * c.link_bw) + c.latency * hops
            return nbytes / c.link_bw + c.latency
        inner = 1 if axis == "dcn_data" else self._inner(axis)
        node = {"switch": c.node, "host": self.par.chips}.get(c.network, 1) if axis != "dcn_data" else 1
        g = max(1, min(n, node // inner)) if inner < node else 1  # the axis' chips within one node
        fast, slow = c.link_bw, c.dcn_bw
        steps = math.ceil(math.log2(n))
        if kind in ("all_gather", "reduce_scatter"):
            inside = nbytes * (g - 1) / n / fast if g > 1 else 0.0
            return inside + nbytes * (1 - g / n) / (g * slow) + c.latency * steps
        if kind == "all_to_all":
            return nbytes * (g - 1) / n / fast + nbytes * (n - g) / n / slow + c.latency * steps
        return nbytes / (fast if inner * n <= node else slow) + c.latency  # a ring crossing nodes waits on its NICs
