"""The model of one data-parallel training step on ``n`` workers, every formula written once here
(docs/performance_model.md states them with their assumptions and sources).

A step of method ``m`` on ``n`` workers::

    step    = compute + selection + exposed
    exposed = exchange - hidden,   hidden = min(overlap * exchange, backward)
    exchange = sum over the buckets and over the method's collectives of their cost

``compute`` is forward + backward of one worker's batch, ``backward`` its backward part;
``selection`` the method's local work on the critical path (DEFT: plan on the leader + the slowest
bin's select; PowerSGD: its matrix products); ``overlap`` the fraction of the exchange that can run
while backward computes (bench/overlap.py's measure), capped by backward's length.

Collective costs (``alpha`` seconds per message, ``B`` bytes per second, ``S`` bytes):

- all-reduce: ring ``2(n-1) alpha + 2 (n-1)/n S/B`` or tree ``2 ceil(log2 n) alpha + 2 S/B``,
  whichever is less (NCCL's tuner picks between them by the same kind of cost);
- all-gather of a share ``s`` per rank (``S = n s``, every share padded to the largest): ring
  ``(n-1) alpha + (n-1)/n S/B``;
- broadcast: binomial tree ``ceil(log2 n) (alpha + S/B)`` or pipelined chain ``(n-1) alpha + S/B``,
  whichever is less; on gloo (``Network.library``) ``(n-1) (alpha + S/B)``, as measured on the
  emulated cluster;
- every collective issued (one with bytes, on ``n >= 2``) also costs the network's ``overhead``
  seconds, once: a fixed cost per call beyond the per-message ``alpha`` (issuing it, the host
  waiting for it, the ranks meeting); 0 by default, calibrated where it is measured
  (bench/validate_projection.py ``--collective-overhead sync``);
- on a two-level network (``per_node`` workers on a fast intra-node link, one inter-node link per
  worker, as rail-optimised GPU servers have): the hierarchical forms of :func:`all_reduce`,
  :func:`all_gather` and :func:`broadcast`.

Nothing here knows a sparsifier: the sequence of collectives and their sizes come from the driver
(:mod:`deft_kernels.benchmarks.project` records them), the laws that carry measured sizes and times
past the measured ``n`` are fitted by :func:`fit_power_law` and :func:`fit_nonnegative`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["GBIT", "Link", "Network", "Collective", "StepParts", "ring_all_reduce", "tree_all_reduce",
           "all_reduce", "all_gather", "broadcast", "collective_time", "exchange_time", "step_parts",
           "break_even", "fit_power_law", "fit_nonnegative", "ddp_buckets"]

#: Bytes per second in one Gb/s.
GBIT = 1e9 / 8


@dataclass(frozen=True)
class Link:
    """One link's per-message latency ``alpha`` (seconds) and bandwidth (bytes per second)."""

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
class Network:
    """Workers on ``inter`` links (one per worker); with ``intra``, groups of ``per_node`` workers
    share a node whose workers talk over ``intra`` (NVLink) and leave it over their own ``inter``."""

    inter: Link
    intra: Link | None = None
    per_node: int = 1
    name: str = ""
    #: whose algorithms: "nccl" (the cheaper of ring/tree, pipelined broadcast) or "gloo" (its
    #: broadcast sends the whole message from the root to every other rank in turn)
    library: str = "nccl"
    #: seconds every collective call costs once, beyond its alpha terms (0: none)
    overhead: float = 0.0

    def __post_init__(self) -> None:
        if self.intra is not None and self.per_node < 2:
            raise ValueError(f"a two-level network needs per_node >= 2, got {self.per_node}")
        if self.library not in ("nccl", "gloo"):
            raise ValueError(f"library must be 'nccl' or 'gloo', got {self.library!r}")
        if not (math.isfinite(self.overhead) and self.overhead >= 0):
            raise ValueError(f"overhead must be a non-negative number of seconds, got {self.overhead!r}")

    def with_bandwidth(self, bandwidth: float) -> Network:
        """The same network with the inter-node link at ``bandwidth`` bytes/s."""
        return Network(self.inter.with_bandwidth(bandwidth), self.intra, self.per_node, self.name, self.library,
                       self.overhead)

    def with_overhead(self, overhead: float) -> Network:
        """The same network with ``overhead`` seconds per collective call."""
        return Network(self.inter, self.intra, self.per_node, self.name, self.library, overhead)


def _log2(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


# ---- one level ------------------------------------------------------------------------------------


def ring_all_reduce(n: int, nbytes: float, link: Link) -> float:
    return 0.0 if n < 2 else 2 * (n - 1) * link.alpha + 2 * (n - 1) / n * nbytes / link.bandwidth


def tree_all_reduce(n: int, nbytes: float, link: Link) -> float:
    return 0.0 if n < 2 else 2 * _log2(n) * link.alpha + 2 * nbytes / link.bandwidth


def _flat_all_reduce(n: int, nbytes: float, link: Link) -> float:
    return min(ring_all_reduce(n, nbytes, link), tree_all_reduce(n, nbytes, link))


def _flat_all_gather(n: int, share: float, link: Link) -> float:
    return 0.0 if n < 2 else (n - 1) * link.alpha + (n - 1) * share / link.bandwidth


def _flat_broadcast(n: int, nbytes: float, link: Link) -> float:
    if n < 2:
        return 0.0
    return min(_log2(n) * (link.alpha + nbytes / link.bandwidth), (n - 1) * link.alpha + nbytes / link.bandwidth)


# ---- on a network (one or two levels) -------------------------------------------------------------


def _levels(n: int, net: Network) -> tuple[int, int]:
    """(workers per node g, nodes m) of ``n`` workers on ``net``."""
    if net.intra is None:
        return 1, n
    g = min(n, net.per_node)
    return g, math.ceil(n / g)


def all_reduce(n: int, nbytes: float, net: Network) -> float:
    """Seconds to all-reduce ``nbytes`` on each of ``n`` workers. Two levels: reduce-scatter inside
    the node, all-reduce of each worker's ``1/g`` share across the ``m`` nodes (each worker on its
    own inter-node link), all-gather inside the node."""
    g, m = _levels(n, net)
    if g == 1:
        return _flat_all_reduce(n, nbytes, net.inter)
    intra = net.intra
    scatter = (g - 1) * intra.alpha + (g - 1) / g * nbytes / intra.bandwidth
    return 2 * scatter + _flat_all_reduce(m, nbytes / g, net.inter)


def all_gather(n: int, share: float, net: Network) -> float:
    """Seconds to all-gather ``share`` bytes from each of ``n`` workers (shares padded to the
    largest). Two levels: all-gather inside the node, then each worker exchanges its share with its
    peers of the same local rank on the other nodes (its own link), then inside the node the
    ``(m-1)(g-1)`` shares its node-mates brought."""
    g, m = _levels(n, net)
    if g == 1:
        return _flat_all_gather(n, share, net.inter)
    intra = net.intra
    local = _flat_all_gather(g, share, intra)
    across = _flat_all_gather(m, share, net.inter)
    spread = 0.0 if m < 2 else (g - 1) * intra.alpha + (m - 1) * (g - 1) * share / intra.bandwidth
    return local + across + spread


def broadcast(n: int, nbytes: float, net: Network) -> float:
    """Seconds to broadcast ``nbytes`` from one worker to ``n``. Two levels: across the nodes, then
    inside every node. gloo: ``(n-1) (alpha + S/B)``, the root sending to each rank in turn."""
    if net.library == "gloo":
        return 0.0 if n < 2 else (n - 1) * (net.inter.alpha + nbytes / net.inter.bandwidth)
    g, m = _levels(n, net)
    if g == 1:
        return _flat_broadcast(n, nbytes, net.inter)
    return _flat_broadcast(m, nbytes, net.inter) + _flat_broadcast(g, nbytes, net.intra)


@dataclass(frozen=True)
class Collective:
    """One collective of a step: ``op`` ("all_reduce", "all_gather", "broadcast") and ``nbytes``
    (all-gather: one rank's padded share; the others: the message), with the ``role`` it plays
    (header, plan, indices, values, ...)."""

    op: str
    nbytes: float
    role: str = ""


_COSTS: dict[str, Callable[[int, float, Network], float]] = {
    "all_reduce": all_reduce, "all_gather": all_gather, "broadcast": broadcast}


def collective_time(c: Collective, n: int, net: Network) -> float:
    """Seconds of one collective, the network's per-call ``overhead`` included; a collective of no
    bytes is not issued (the driver skips it), nor anything on one worker."""
    if c.op not in _COSTS:
        raise ValueError(f"unknown collective {c.op!r}; known: {sorted(_COSTS)}")
    if c.nbytes <= 0 or n < 2:
        return 0.0
    return _COSTS[c.op](n, c.nbytes, net) + net.overhead


def exchange_time(sequence: Sequence[Collective], n: int, net: Network, buckets: int = 1) -> float:
    """Seconds of a step's exchange: ``sequence`` holds the step's collectives with their bytes
    summed over the buckets; each of the ``buckets`` issues every collective once, so the
    bandwidth terms add up to the sequence's and the latency terms are paid ``buckets`` times."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    total = 0.0
    for c in sequence:
        per_bucket = Collective(c.op, c.nbytes / buckets, c.role)
        total += buckets * collective_time(per_bucket, n, net)
    return total


def ddp_buckets(nbytes: float, bucket_mb: float, first_mb: float = 1.0) -> int:
    """DDP's bucket count for ``nbytes`` of gradients: a first bucket of ``first_mb`` MiB, then
    ``bucket_mb`` MiB each (DDP's defaults: 1 and 25; parameters are not split, so this is the
    count when tensors fill buckets evenly)."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_mb!r}")
    first = first_mb * 2 ** 20
    return 1 if nbytes <= first else 1 + math.ceil((nbytes - first) / (bucket_mb * 2 ** 20))


@dataclass(frozen=True)
class StepParts:
    """A predicted step, seconds."""

    compute: float
    selection: float
    exchange: float
    hidden: float

    @property
    def exposed(self) -> float:
        return self.exchange - self.hidden

    @property
    def step(self) -> float:
        return self.compute + self.selection + self.exposed


def step_parts(compute: float, backward: float, selection: float, exchange: float, overlap: float) -> StepParts:
    """The step: ``compute + selection + exchange - min(overlap * exchange, backward)``."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must lie in [0, 1], got {overlap!r}")
    if not 0.0 <= backward <= compute:
        raise ValueError(f"backward must lie in [0, compute], got {backward!r} of {compute!r}")
    return StepParts(compute, selection, exchange, min(overlap * exchange, backward))


def break_even(advantage: Callable[[float], float], low: float, high: float, iters: int = 60) -> float | None:
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
