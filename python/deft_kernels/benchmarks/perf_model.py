"""The model of one data-parallel training step on ``n`` workers, every formula written once here
(docs/performance_model.md states them with their assumptions and sources).

A step of method ``m`` on ``n`` workers::

    step     = compute + selection + exposed
    exposed  = exchange - hidden
    hidden   = min(overlap * (exchange - tail), backward)
    exchange = sum over the DDP buckets of their collectives' cost;  tail = the last bucket's

``compute`` is forward + backward of one worker's batch, ``backward`` its backward part;
``selection`` the method's local work on the critical path; ``overlap`` how much of the exchange
the method's hook lets run during backward (1: each bucket's collectives start when the bucket is
ready and run on their own stream; 0: the hook waits for them inline); ``tail`` the exchange of
the last bucket to be ready, which starts only when backward ends and so is never hidden.

Collective costs follow a named NCCL version's tuner (:data:`NCCL_VERSION`,
``src/graph/tuning.cc``): for every algorithm the tuner allows for the collective (all-reduce: ring
or tree; all-gather: ring, or PAT with one GPU per node; broadcast: ring only) and every protocol
(LL, LL128, Simple), ``time = latency(algorithm, protocol, n, nodes) + bytes / bandwidth``, with
the tuner's base and per-step latencies, its protocol and algorithm bandwidth factors (the tree's
derate and size correction included) and the bus bandwidth of the network
(``line rate x bus efficiency``); the cheapest is taken, as NCCL's tuner takes the cheapest of its
own estimates. On gloo (``Network.library``, the emulated cluster) the collectives are priced by
gloo's algorithms with one latency per step, as calibrated there. :class:`Assumptions` turns each
modelling choice off, one at a time (the sensitivity table of BENCHMARKS.md).

Every collective issued (one with bytes, on ``n >= 2``) also costs the network's ``overhead``
seconds, once: a fixed cost per call beyond the latencies, 0 by default, calibrated where it is
measured (bench/validate_projection.py ``--collective-overhead sync``).

Nothing here knows a sparsifier: the sequence of collectives and their sizes come from the driver
(:mod:`deft_kernels.benchmarks.project` records them), the laws that carry measured sizes and times
past the measured ``n`` are fitted by :func:`fit_power_law` and :func:`fit_nonnegative`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["GBIT", "NCCL_VERSION", "PROTOCOLS", "Link", "BusEfficiency", "Assumptions", "Network", "Collective",
           "Choice", "StepParts", "candidate_times", "all_reduce", "all_gather", "broadcast", "choose", "collective_time",
           "collective_times", "Exchange", "exchange_time", "step_parts", "break_even", "fit_power_law",
           "fit_nonnegative", "ddp_bucket_assignment"]

#: Bytes per second in one Gb/s.
GBIT = 1e9 / 8
_US = 1e-6

# ---- NCCL's tuner --------------------------------------------------------------------------------
# The constants of NCCL 2.26.2's src/graph/tuning.cc (unchanged from 2.23 to 2.30 except PAT's
# bandwidth factor, 0.85 in 2.23-2.25): microseconds per protocol (LL, LL128, Simple).

NCCL_VERSION = "2.26.2"
PROTOCOLS = ("LL", "LL128", "Simple")
_BASE = {"ring": (6.6, 14.0, 8.4), "tree": (6.8, 14.0, 8.4)}  # baseLat
_NET_STEP = {"ring": (2.7, 4.0, 14.0), "tree": (5.0, 8.5, 14.0)}  # hwLat[NET]
_NVLINK_STEP = {"ring": (0.6, 1.9, 3.4), "tree": (0.6, 1.25, 4.0)}  # hwLat[NVLINK]
#: Per-step host cost of posting a network operation (getNetOverhead: 1 us on Intel CPUs, 2 on
#: AMD; x3 for Simple): the least an NVLink step of a multi-node ring costs.
_NET_OVERHEAD = 1.0
#: Bandwidth factors: ring LL 1/2, LL128 0.92 (120/128); tree all-reduce 0.92, then LL 1/3.8 and
#: LL128 120/128 across nodes (7/9 inside one); PAT 0.75.
_RING_BW = (0.5, 0.92, 1.0)
_TREE_DERATE = 0.92
_TREE_BW = (1 / 3.8, 120 / 128, 1.0)
_TREE_BW_ONE_NODE = (1 / 3.8, 7 / 9, 1.0)
_PAT_BW = 0.75
#: treeCorrectionFactor: the tree all-reduce's bandwidth at log2(bytes / 64) = 0 .. 22 (64 B to 256 MB).
_TREE_CORRECTION = np.array([
    [1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0],
    [1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0],
    [.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9]])
#: The ring's latency "plateau" (Simple all-reduce across nodes, compute capability >= 8.0; 1.9
#: below), applied where a channel's share per rank is at least 64 bytes (with 8 channels assumed).
_RING_PLATEAU, _PLATEAU_CHANNELS = 1.4, 8
#: PAT's latency: 8 us + log2(nodes) x (the inter-node Simple step / 3.5) + 2.8 us per rank.
_PAT_BASE, _PAT_LOG_DIVISOR, _PAT_PER_RANK = 8.0, 3.5, 2.8


@dataclass(frozen=True)
class Link:
    """A link's latency (seconds) and bandwidth (bytes per second). For the inter-node link of an
    NCCL network: the line rate per worker and the network's own latency per inter-node step,
    added to the tuner's (what NCCL takes from a net plugin; 0 for its IB and socket plugins)."""

    alpha: float
    bandwidth: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"latency must be a non-negative number of seconds, got {self.alpha!r}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")

    def with_bandwidth(self, bandwidth: float) -> Link:
        return Link(self.alpha, bandwidth)


@dataclass(frozen=True)
class BusEfficiency:
    """The bus bandwidth a collective reaches, as a fraction of the line rate, by node count: a
    step function over ``table`` ``((nodes, efficiency), ...)``, node counts ascending: the value of
    the largest entry at or below the node count (the first entry's below it)."""

    table: tuple[tuple[int, float], ...] = ((1, 1.0),)

    def __post_init__(self) -> None:
        if not self.table:
            raise ValueError("a bus efficiency table needs at least one (nodes, efficiency) entry")
        nodes = [m for m, _ in self.table]
        if any(not isinstance(m, int) or m < 1 for m in nodes) or nodes != sorted(set(nodes)):
            raise ValueError(f"bus efficiency node counts must be ascending positive ints, got {nodes}")
        for _, e in self.table:
            if not (isinstance(e, (int, float)) and 0 < e <= 1):
                raise ValueError(f"bus efficiency must lie in (0, 1], got {e!r}")

    @classmethod
    def constant(cls, efficiency: float) -> BusEfficiency:
        return cls(((1, efficiency),))

    def at(self, nodes: int) -> float:
        value = self.table[0][1]
        for m, e in self.table:
            if m <= nodes:
                value = e
        return value

    def describe(self) -> str:
        if len(self.table) == 1:
            return f"{self.table[0][1]:g}"
        return ", ".join(f"{e:g} from {m} nodes" for m, e in self.table)


@dataclass(frozen=True)
class Assumptions:
    """The modelling choices, each of which can be turned off to see what an answer rests on.

    ``ring_broadcast``: NCCL broadcasts by ring only (a pipelined chain: ``n - 1`` steps of
    latency); off: the cheaper of a binomial tree and that chain. ``pat``: NCCL's PAT all-gather
    where it applies (one GPU per node); off: ring only. ``tree_derate``: the tuner's 0.92 and size
    correction of the tree all-reduce's bandwidth; off: the tree at the full bus bandwidth.
    ``protocol_latency``: the tuner's base and per-step latencies per protocol, the cheapest of LL,
    LL128 and Simple with their bandwidth factors; off: one flat latency per inter-node step
    (``flat_step_s``, plus the link's own) and per NVLink step (the intra link's ``alpha``), no
    base latency, Simple's bandwidth."""

    ring_broadcast: bool = True
    pat: bool = True
    tree_derate: bool = True
    protocol_latency: bool = True
    flat_step_s: float = 10 * _US


@dataclass(frozen=True)
class Network:
    """Workers on ``inter`` links (one per worker); with ``intra``, groups of ``per_node`` workers
    share a node whose workers talk over ``intra`` (NVLink: its bus bandwidth, and its latency per
    step where protocol latencies are off) and leave it over their own ``inter`` link."""

    inter: Link
    intra: Link | None = None
    per_node: int = 1
    name: str = ""
    #: whose algorithms: "nccl" (its tuner's) or "gloo" (ring all-reduce and all-gather, broadcast
    #: from the root to each rank in turn, one latency ``inter.alpha`` per step)
    library: str = "nccl"
    #: seconds every collective call costs once, beyond its latencies (0: none)
    overhead: float = 0.0
    #: the bus bandwidth's fraction of ``inter``'s line rate, by node count
    efficiency: BusEfficiency = BusEfficiency()
    assumptions: Assumptions = Assumptions()

    def __post_init__(self) -> None:
        if self.intra is not None and self.per_node < 2:
            raise ValueError(f"a two-level network needs per_node >= 2, got {self.per_node}")
        if self.library not in ("nccl", "gloo"):
            raise ValueError(f"library must be 'nccl' or 'gloo', got {self.library!r}")
        if self.library == "gloo" and self.intra is not None:
            raise ValueError("a gloo network has one level (no intra link)")
        if not (math.isfinite(self.overhead) and self.overhead >= 0):
            raise ValueError(f"overhead must be a non-negative number of seconds, got {self.overhead!r}")

    def with_bandwidth(self, bandwidth: float) -> Network:
        """The same network with the inter-node link's line rate at ``bandwidth`` bytes/s."""
        return replace(self, inter=self.inter.with_bandwidth(bandwidth))

    def with_overhead(self, overhead: float) -> Network:
        """The same network with ``overhead`` seconds per collective call."""
        return replace(self, overhead=overhead)

    def levels(self, n: int) -> tuple[int, int]:
        """(workers per node g, nodes m) of ``n`` workers."""
        if self.intra is None:
            return 1, n
        g = min(n, self.per_node)
        return g, math.ceil(n / g)

    def bus_bandwidth(self, n: int) -> float:
        """Bytes/s of a collective's bus on ``n`` workers: the line rate times the efficiency at
        that node count; on NVLink nodes every worker's own NIC carries its share (``g`` NICs per
        node), bounded by NVLink; inside one node NVLink's."""
        g, m = self.levels(n)
        across = self.inter.bandwidth * self.efficiency.at(m)
        if self.intra is None:
            return across
        return self.intra.bandwidth if m == 1 else min(g * across, self.intra.bandwidth)


def _log2i(x: int) -> int:
    """NCCL's log2i: floor(log2(x)), -1 for 0."""
    return int(x).bit_length() - 1


# ---- the candidates of one collective ------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    algorithm: str
    protocol: str
    latency: float  # seconds
    bandwidth: float  # bytes/s of NCCL's nBytes (all-gather: the gathered total), before a tree correction
    tree_correction: int | None = None  # row of _TREE_CORRECTION applied to the bandwidth by size
    plateau_bytes: float = math.inf  # nBytes from which the ring's latency plateau applies


def _nccl_candidates(op: str, n: int, net: Network) -> list[_Candidate]:
    a = net.assumptions
    g, m = net.levels(n)
    bus = net.bus_bandwidth(n)
    extra = net.inter.alpha
    one_node = m == 1
    out = []
    protocols = range(3) if a.protocol_latency else (2,)
    for p in protocols:
        proto = PROTOCOLS[p]
        simple = proto == "Simple"

        def step(kind: str) -> tuple[float, float]:
            """(latency of one inter-node step, of one NVLink step) for algorithm ``kind``."""
            if not a.protocol_latency:
                return a.flat_step_s + extra, (net.intra.alpha if net.intra is not None else 0.0)
            inter = (_NET_STEP["tree"] if g == 1 else _NET_STEP[kind])[p] * _US + extra * (2 if simple else 1)
            nvl = _NVLINK_STEP[kind][p] * _US
            if kind == "ring" and not one_node:
                nvl = max(nvl, _NET_OVERHEAD * (3 if simple else 1) * _US)
            return inter, nvl

        base_ring = _BASE["ring"][p] * _US if a.protocol_latency else 0.0
        ring_bw = bus * (_RING_BW[p] if a.protocol_latency else 1.0)
        inter, nvl = step("ring")
        if one_node:
            inter = nvl
        if op == "all_reduce":
            lat = base_ring + (2 * (n - 1) - 2 * (m - 1)) * nvl + 2 * (m - 1) * inter
            plateau = 64 * _PLATEAU_CHANNELS * n if simple and m > 1 and a.protocol_latency else math.inf
            out.append(_Candidate("ring", proto, lat, ring_bw * n / (2 * (n - 1)), plateau_bytes=plateau))
            tree_inter, tree_nvl = step("tree")
            base_tree = _BASE["tree"][p] * _US if a.protocol_latency else 0.0
            lat = base_tree + 2 * ((g - 1) * tree_nvl + _log2i(m) * tree_inter)
            factor = (_TREE_BW_ONE_NODE if one_node else _TREE_BW)[p] if a.protocol_latency else 1.0
            derate = _TREE_DERATE if a.tree_derate else 1.0
            out.append(_Candidate("tree", proto, lat, bus * derate * factor * 0.5,
                                  p if a.tree_derate else None))
        elif op == "all_gather":
            lat = base_ring + ((n - 1) - (m - 1)) * nvl + (m - 1) * inter
            out.append(_Candidate("ring", proto, lat, ring_bw * n / (n - 1)))
            if a.pat and simple and g == 1:  # PAT: one GPU per node, Simple only
                if a.protocol_latency:
                    lat = (_PAT_BASE + _log2i(m) * (_NET_STEP["tree"][2] + 2 * extra / _US) / _PAT_LOG_DIVISOR
                           + _PAT_PER_RANK * n) * _US
                else:
                    lat = _log2i(m) * (a.flat_step_s + extra) + _PAT_PER_RANK * n * _US
                out.append(_Candidate("pat", proto, lat, bus * _PAT_BW))
        elif op == "broadcast":
            chain = base_ring + ((n - 1) - (m - 1)) * nvl + (m - 1) * inter
            out.append(_Candidate("ring", proto, chain, ring_bw))
            if not a.ring_broadcast:  # a binomial tree: ceil(log2 n) rounds, the whole message each
                rounds = math.ceil(math.log2(n))
                out.append(_Candidate("binomial", proto, base_ring + rounds * inter, ring_bw / rounds))
        else:
            raise ValueError(f"unknown collective {op!r}; known: all_reduce, all_gather, broadcast")
    return out


def _gloo_candidates(op: str, n: int, net: Network) -> list[_Candidate]:
    alpha, bw = net.inter.alpha, net.inter.bandwidth * net.efficiency.at(n)
    if op == "all_reduce":  # ring: 2(n-1) alpha + 2(n-1)/n S/B
        return [_Candidate("ring", "gloo", 2 * (n - 1) * alpha, bw * n / (2 * (n - 1)))]
    if op == "all_gather":  # ring: (n-1) alpha + (n-1) s/B, s = nBytes / n
        return [_Candidate("ring", "gloo", (n - 1) * alpha, bw * n / (n - 1))]
    if op == "broadcast":  # the root sends the whole message to each rank in turn: (n-1)(alpha + S/B)
        return [_Candidate("root", "gloo", (n - 1) * alpha, bw / (n - 1))]
    raise ValueError(f"unknown collective {op!r}; known: all_reduce, all_gather, broadcast")


def _candidates(op: str, n: int, net: Network) -> list[_Candidate]:
    return (_gloo_candidates if net.library == "gloo" else _nccl_candidates)(op, n, net)


def _total_bytes(op: str, n: int, nbytes):
    """NCCL's nBytes of a collective: all-gather counts every rank's share."""
    return nbytes * n if op == "all_gather" else nbytes


def _seconds(c: _Candidate, total) -> np.ndarray:
    total = np.asarray(total, dtype=np.float64)
    bw = np.full(total.shape, c.bandwidth)
    if c.tree_correction is not None:
        index = np.floor(np.log2(np.maximum(total, 1.0) / 64.0)).astype(np.int64)
        index = np.where(total < 64, -1, index)
        inside = (index >= 0) & (index < _TREE_CORRECTION.shape[1])
        bw = np.where(inside, bw * _TREE_CORRECTION[c.tree_correction][np.clip(index, 0, _TREE_CORRECTION.shape[1] - 1)],
                      bw)
    lat = np.where(total >= c.plateau_bytes, _RING_PLATEAU * c.latency, c.latency)
    return lat + total / bw


@dataclass(frozen=True)
class Choice:
    """What a collective costs and how NCCL (or gloo) runs it."""

    seconds: float
    algorithm: str
    protocol: str


def _costs(op: str, n: int, nbytes: np.ndarray, net: Network) -> tuple[np.ndarray, np.ndarray]:
    """Per message: seconds of the cheapest candidate (no overhead) and its index in
    :func:`_candidates`."""
    total = _total_bytes(op, n, np.asarray(nbytes, dtype=np.float64))
    table = np.vstack([_seconds(c, total) for c in _candidates(op, n, net)])
    best = np.argmin(table, axis=0)
    return table[best, np.arange(table.shape[1])], best


def _check(op: str, n: int) -> None:
    if op not in _COLLECTIVES:
        raise ValueError(f"unknown collective {op!r}; known: {sorted(_COLLECTIVES)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


def choose(op: str, n: int, nbytes: float, net: Network) -> Choice:
    """The cheapest algorithm and protocol for one collective (``nbytes``: the message; for an
    all-gather one rank's share) and its seconds, the per-call overhead not included."""
    _check(op, n)
    if n < 2 or nbytes <= 0:
        return Choice(0.0, "none", "none")
    seconds, best = _costs(op, n, np.array([float(nbytes)]), net)
    c = _candidates(op, n, net)[int(best[0])]
    return Choice(float(seconds[0]), c.algorithm, c.protocol)


def candidate_times(op: str, n: int, nbytes: float, net: Network) -> dict[tuple[str, str], float]:
    """Seconds of one collective by every algorithm and protocol the model offers for it (what the
    tuner compares; the per-call overhead not included): ``{(algorithm, protocol): seconds}``."""
    _check(op, n)
    if n < 2:
        return {}
    total = _total_bytes(op, n, np.array([float(nbytes)]))
    return {(c.algorithm, c.protocol): float(_seconds(c, total)[0]) for c in _candidates(op, n, net)}


def all_reduce(n: int, nbytes: float, net: Network) -> float:
    """Seconds to all-reduce ``nbytes`` on each of ``n`` workers."""
    return choose("all_reduce", n, nbytes, net).seconds


def all_gather(n: int, share: float, net: Network) -> float:
    """Seconds to all-gather ``share`` bytes from each of ``n`` workers (shares padded to the largest)."""
    return choose("all_gather", n, share, net).seconds


def broadcast(n: int, nbytes: float, net: Network) -> float:
    """Seconds to broadcast ``nbytes`` from one worker to ``n``."""
    return choose("broadcast", n, nbytes, net).seconds


_COLLECTIVES = ("all_reduce", "all_gather", "broadcast")


@dataclass(frozen=True)
class Collective:
    """One collective of a step: ``op`` ("all_reduce", "all_gather", "broadcast") and ``nbytes``
    (all-gather: one rank's padded share; the others: the message), with the ``role`` it plays
    (header, plan, indices, values, ...)."""

    op: str
    nbytes: float
    role: str = ""


def collective_times(op: str, nbytes: Sequence[float] | np.ndarray, n: int, net: Network) -> np.ndarray:
    """Seconds of each of several collectives ``op`` of ``nbytes``, the network's per-call
    ``overhead`` included; a collective of no bytes is not issued (the driver skips it), nor
    anything on one worker."""
    _check(op, n)
    nbytes = np.asarray(nbytes, dtype=np.float64)
    if n < 2 or nbytes.size == 0:
        return np.zeros(nbytes.shape)
    seconds, _ = _costs(op, n, nbytes, net)
    return np.where(nbytes > 0, seconds + net.overhead, 0.0)


def collective_time(c: Collective, n: int, net: Network) -> float:
    """Seconds of one collective, the per-call overhead included (:func:`collective_times`)."""
    return float(collective_times(c.op, [c.nbytes], n, net)[0])


class Exchange:
    """A step's collectives, one list per DDP bucket in the order the buckets become ready,
    prepared once to be priced on many networks (a break-even search prices it dozens of times)."""

    def __init__(self, buckets: Sequence[Sequence[Collective]]) -> None:
        if not buckets:
            raise ValueError("need at least one bucket")
        unknown = {c.op for seq in buckets for c in seq} - set(_COLLECTIVES)
        if unknown:
            raise ValueError(f"unknown collective {sorted(unknown)[0]!r}; known: {sorted(_COLLECTIVES)}")
        self.buckets = len(buckets)
        self.groups = {}
        for op in _COLLECTIVES:
            where = [(b, c.nbytes) for b, seq in enumerate(buckets) for c in seq if c.op == op]
            if where:
                index, nbytes = zip(*where)
                self.groups[op] = (np.array(index), np.array(nbytes, dtype=np.float64))

    def bucket_times(self, n: int, net: Network) -> np.ndarray:
        """Seconds of each bucket's collectives, each priced by :func:`collective_times`."""
        out = np.zeros(self.buckets)
        for op, (index, nbytes) in self.groups.items():
            np.add.at(out, index, collective_times(op, nbytes, n, net))
        return out

    def time(self, n: int, net: Network) -> tuple[float, float]:
        """``(exchange, tail)``: the seconds of every bucket's collectives and of the last bucket's."""
        times = self.bucket_times(n, net)
        return float(times.sum()), float(times[-1])


def exchange_time(buckets: Sequence[Sequence[Collective]], n: int, net: Network) -> tuple[float, float]:
    """``(exchange, tail)`` of a step's collectives, one list per bucket (:class:`Exchange`)."""
    return Exchange(buckets).time(n, net)


def ddp_bucket_assignment(nbytes: Sequence[int], bucket_mb: float = 25.0, first_mb: float | None = 1.0) -> list[list[int]]:
    """DDP's buckets for parameters of ``nbytes`` each (in ``model.parameters()`` order): lists of
    parameter indices, in the order the buckets become ready. As DDP's rebuilt buckets: the
    parameters in reverse (the order backward produces their gradients), a bucket closed as soon as
    it holds at least its cap: ``first_mb`` MiB for the first (DDP's default 1 MiB when no
    ``bucket_cap_mb`` is given; ``None``: the same cap as the others), ``bucket_mb`` MiB after."""
    if not bucket_mb > 0 or (first_mb is not None and not first_mb > 0):
        raise ValueError(f"bucket sizes must be positive, got {bucket_mb!r} and {first_mb!r}")
    if any(b < 0 for b in nbytes):
        raise ValueError("parameter sizes must be non-negative")
    caps = [(first_mb if first_mb is not None else bucket_mb) * 2 ** 20, bucket_mb * 2 ** 20]
    buckets, current, size = [], [], 0
    for i in reversed(range(len(nbytes))):
        current.append(i)
        size += nbytes[i]
        if size >= caps[min(len(buckets), 1)]:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class StepParts:
    """A predicted step, seconds."""

    compute: float
    selection: float
    exchange: float
    hidden: float
    tail: float = 0.0

    @property
    def exposed(self) -> float:
        return self.exchange - self.hidden

    @property
    def step(self) -> float:
        return self.compute + self.selection + self.exposed


def step_parts(compute: float, backward: float, selection: float, exchange: float, overlap: float,
               tail: float = 0.0) -> StepParts:
    """The step: ``compute + selection + exchange - min(overlap * (exchange - tail), backward)``:
    the last bucket's ``tail`` is never hidden."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must lie in [0, 1], got {overlap!r}")
    if not 0.0 <= backward <= compute:
        raise ValueError(f"backward must lie in [0, compute], got {backward!r} of {compute!r}")
    if not 0.0 <= tail <= exchange * (1 + 1e-12):
        raise ValueError(f"tail must lie in [0, exchange], got {tail!r} of {exchange!r}")
    return StepParts(compute, selection, exchange, min(overlap * max(0.0, exchange - tail), backward), tail)


def break_even(advantage: Callable[[float], float], low: float, high: float, iters: int = 48) -> float | None:
    """The bandwidth in ``[low, high]`` (bytes/s) where ``advantage(bandwidth)`` (all-reduce's step
    minus the method's: positive where the method is faster) crosses zero, by bisection on a log
    scale; ``low`` when the method is never faster, ``None`` when it is faster even at ``high``.
    The advantage falls as bandwidth grows (the method sends less and adds fixed work)."""
    if advantage(high) > 0:
        return None
    if advantage(low) <= 0:
        return low
    lo, hi = math.log(low), math.log(high)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if advantage(math.exp(mid)) > 0:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


# ---- laws fitted to measurements ------------------------------------------------------------------


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(a, b)`` of ``y = a x^b`` by least squares on ``log y`` against ``log x`` (>= 2 points)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least two (x, y) points, got {len(xs)} and {len(ys)}")
    if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        raise ValueError("a power law needs positive x and y")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError("a power law needs at least two distinct x")
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
    return math.exp(my - b * mx), b


def fit_nonnegative(features: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least-squares ``y ~ sum_i theta_i f_i`` with two features and ``theta >= 0`` (a cost cannot
    be negative): the unconstrained solution, or the better one-feature fit when it has a negative
    coefficient."""
    if len(features) != len(ys) or not ys or any(len(f) != 2 for f in features):
        raise ValueError("need one pair of features per measurement")

    def one(i: int) -> list[float]:
        sff = sum(f[i] ** 2 for f in features)
        theta = [0.0, 0.0]
        theta[i] = max(0.0, sum(f[i] * y for f, y in zip(features, ys)) / sff) if sff else 0.0
        return theta

    def sse(theta: list[float]) -> float:
        return sum((theta[0] * f[0] + theta[1] * f[1] - y) ** 2 for f, y in zip(features, ys))

    a = sum(f[0] * f[0] for f in features)
    b = sum(f[0] * f[1] for f in features)
    c = sum(f[1] * f[1] for f in features)
    r0 = sum(f[0] * y for f, y in zip(features, ys))
    r1 = sum(f[1] * y for f, y in zip(features, ys))
    det = a * c - b * b
    if det > 1e-12 * max(a * c, 1e-300):
        theta = [(c * r0 - b * r1) / det, (a * r1 - b * r0) / det]
        if min(theta) >= 0:
            return theta
    return min((one(0), one(1)), key=sse)
