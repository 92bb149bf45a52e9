"""An emulated cluster on one Linux machine: nodes are network namespaces joined by shaped links.

Layout (every name starts with ``<prefix>-``, so clusters of different prefixes never touch)::

    <prefix>-sw      a namespace holding the switch: bridge <prefix>-br and one port <prefix>-h<i> per node
    <prefix>-n<i>    node i's namespace: lo, and <prefix>-v<i> (the other end of the port's veth pair)
                     with address 198.18.0.<i+1>/24 (198.18.0.0/15 is reserved for network benchmarks)

Nothing is created in the root namespace: no link, no address, no route, so traffic can only flow
between the nodes. ``tc tbf`` shapes the egress of both ends of every veth pair (a qdisc shapes only
what leaves a device), so each node sends and receives at the set rate, as through a switch port of
that speed. There is no propagation delay and no loss (the kernels here have no ``netem``); a cut
cable is :meth:`Cluster.link_down`. docs/cluster.md says more.

Use it as a context manager; everything is torn down on exit, on an exception and on SIGINT/SIGTERM
(processes left in the node namespaces are killed first: a namespace with a process in it outlives
``ip netns del``)::

    with Cluster(nodes=2, bandwidth="1gbit") as c:
        results = c.run(lambda node: c.torchrun_argv(node.index, ["train.py"]), timeout=120)

From the command line: ``deft-bench cluster --nodes 2 --bandwidth 1gbit -- CMD ...`` (``{rank}``,
``{addr}``, ``{nodes}``, ``{master}`` and ``{ifname}`` in CMD are replaced per node), ``deft-bench
cluster torchrun --nodes 2 -- train.py ...``, ``deft-bench cluster check-shaping``, ``deft-bench
cluster cleanup``. It needs root and iproute2; :func:`check_available` says in one line what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

__all__ = ["Cluster", "Node", "check_available", "cleanup", "parse_rate", "bulk_transfer", "OneLineParser", "main"]

SUBNET = "198.18.0"  # node i is SUBNET.(i+1)/24, inside its own namespace only
MAX_NODES = 99  # "<prefix>-h99" must fit Linux's 15-character interface names
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,9}")
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)", re.IGNORECASE)
_RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}  # tc's units: bps = bytes/s
_IP_TIMEOUT = 20.0  # one ip/tc command; they take milliseconds


def parse_rate(rate: str) -> float:
    """A tc rate (``100mbit``, ``1gbit``, ``1.5gbit``, ``125mbps`` = bytes/s) in bits per second."""
    m = _RATE.fullmatch(str(rate).strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"bandwidth {rate!r} is not a tc rate such as 100mbit, 1gbit or 10gbit")
    return float(m.group(1)) * _RATE_SCALE[m.group(2).lower()]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=_IP_TIMEOUT, check=check)


def check_available() -> str | None:
    """None if this machine can make a cluster (root, ``ip``, ``tc``, namespaces, veth, tbf), else one
    line saying what is missing. Probes by making (and removing) a namespace of its own."""
    if not sys.platform.startswith("linux"):
        return f"the emulated cluster needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"the emulated cluster needs root to make network namespaces (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the emulated cluster needs iproute2: '{tool}' is not on PATH"
    probe = f"dkprobe-{os.getpid()}"
    steps = [("ip", "netns", "add", probe),
             ("ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"),
             ("tc", "-n", probe, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1gbit", "burst", "64kb",
              "latency", "50ms")]
    try:
        for step in steps:
            r = _ip(*step, check=False)
            if r.returncode != 0:
                what = {"netns": "network namespaces", "link": "veth links", "qdisc": "tc tbf"}[step[3] if step[1] == "-n" else step[1]]
                return f"the emulated cluster needs {what}: '{' '.join(step)}' failed: {r.stderr.strip() or r.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the emulated cluster needs iproute2 to work: {e}"
    finally:
        _ip("ip", "netns", "del", probe, check=False)
    return None


def _check_prefix(prefix: str) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be 1-10 lowercase letters or digits, starting with a letter")


def _netns_names() -> list[str]:
    r = _ip("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in _ip("ip", "netns", "pids", ns, check=False).stdout.split()]


def _kill_netns_processes(ns: str, deadline: float) -> None:
    """SIGKILL every process in namespace ``ns`` (only processes this project's namespace holds) and
    wait until they are gone, so that deleting the namespace frees its links."""
    while True:
        pids = _netns_pids(ns)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def cleanup(prefix: str) -> list[str]:
    """Remove everything a cluster of this prefix left behind (its processes, namespaces, links,
    qdiscs) and return what was removed. Names match ``<prefix>-`` exactly: ``dk`` never touches ``dkc-...``."""
    _check_prefix(prefix)
    head = f"{prefix}-"
    removed = []
    deadline = time.monotonic() + 10
    namespaces = [ns for ns in _netns_names() if ns.startswith(head)]
    for ns in namespaces:
        _kill_netns_processes(ns, deadline)
    for ns in namespaces:
        if _ip("ip", "netns", "del", ns, check=False).returncode == 0:
            removed.append(f"netns {ns}")
    # Links of this prefix in the root namespace: none are made there, but a cluster interrupted while
    # its links were being moved could leave one. Deleting a veth end deletes its peer and qdiscs.
    r = _ip("ip", "-o", "link", "show", check=False)
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        if name.startswith(head) and _ip("ip", "link", "del", name, check=False).returncode == 0:
            removed.append(f"link {name}")
    return removed


@dataclass(frozen=True)
class Node:
    index: int
    netns: str  # the node's namespace
    ifname: str  # its end of the veth pair, inside ``netns``
    host_ifname: str  # the switch's end (a bridge port, in the switch namespace ``Cluster.switch``)
    address: str  # the node's IPv4 address on ``ifname``


class Cluster:
    """``nodes`` namespaces on one bridge, each link shaped to ``bandwidth`` in both directions
    (None: not shaped). ``burst`` is tbf's bucket in bytes (default: 1 ms at the rate, at least 32 KiB,
    so that a transfer of a few hundred KB is not sent unshaped); ``latency`` bounds tbf's queue.
    ``mtu``: the links' MTU (1500, Ethernet's). Leftovers of the same prefix are removed at start."""

    def __init__(self, nodes: int, bandwidth: str | None = "1gbit", prefix: str = "dk", burst: int | None = None,
                 latency: str = "100ms", mtu: int = 1500) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be an integer in 1..{MAX_NODES}, got {nodes!r}")
        _check_prefix(prefix)
        if bandwidth is not None:
            parse_rate(bandwidth)
        if burst is not None and (not isinstance(burst, int) or burst < mtu + 14):
            raise ValueError(f"burst must be an integer of bytes >= one frame ({mtu + 14}), got {burst!r}")
        self.prefix = prefix
        self.bandwidth = bandwidth
        self.burst = burst
        self.latency = latency
        self.mtu = mtu
        self.switch = f"{prefix}-sw"
        self.bridge = f"{prefix}-br"
        self.nodes = [Node(i, f"{prefix}-n{i}", f"{prefix}-v{i}", f"{prefix}-h{i}", f"{SUBNET}.{i + 1}")
                      for i in range(nodes)]
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._old_handlers: dict[int, object] = {}
        self._up = False

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        missing = check_available()
        if missing:
            raise RuntimeError(missing)
        self._install_signal_handlers()
        try:
            cleanup(self.prefix)
            self._up = True
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process this cluster started, then remove its namespaces (and with them its
        links and qdiscs). Safe to call twice."""
        with self._lock:
            procs, self._procs = self._procs, []
        for p in procs:
            _kill_group(p)
        if self._up:
            self._up = False
            cleanup(self.prefix)
        self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def raise_interrupt(signum, frame):
            # Unwind through the with-block (and its teardown) as Ctrl-C does.
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, raise_interrupt)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _build(self) -> None:
        _ip("ip", "netns", "add", self.switch)
        _ip("ip", "-n", self.switch, "link", "add", self.bridge, "type", "bridge")
        _ip("ip", "-n", self.switch, "link", "set", self.bridge, "up")
        for node in self.nodes:
            _ip("ip", "netns", "add", node.netns)
            _ip("ip", "-n", node.netns, "link", "set", "lo", "up")
            _ip("ip", "-n", self.switch, "link", "add", node.host_ifname, "mtu", str(self.mtu), "type", "veth",
                "peer", "name", node.ifname, "netns", node.netns, "mtu", str(self.mtu))
            _ip("ip", "-n", self.switch, "link", "set", node.host_ifname, "master", self.bridge)
            _ip("ip", "-n", self.switch, "link", "set", node.host_ifname, "up")
            _ip("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.ifname)
            _ip("ip", "-n", node.netns, "link", "set", node.ifname, "up")
        self.set_bandwidth(self.bandwidth)

    # -- links ----------------------------------------------------------------------------------------

    def _ends(self, node: Node) -> list[tuple[str, str]]:
        return [(node.netns, node.ifname), (self.switch, node.host_ifname)]

    def tbf_burst(self, rate: str) -> int:
        """tbf's bucket for ``rate``: the one given, else 1 ms of traffic, at least 32 KiB."""
        return self.burst if self.burst is not None else max(32 * 1024, int(parse_rate(rate) / 8 / 1000))

    def set_bandwidth(self, rate: str | None) -> None:
        """Shape every link (both directions) to ``rate``; None removes the shaping."""
        if rate is not None:
            parse_rate(rate)
        for node in self.nodes:
            for ns, dev in self._ends(node):
                if rate is None:
                    _ip("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                else:
                    _ip("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", str(self.tbf_burst(rate)), "latency", self.latency)
        self.bandwidth = rate

    def link_down(self, node: int) -> None:
        """Cut node ``node``'s cable: its switch port goes down (its own end loses carrier)."""
        _ip("ip", "-n", self.switch, "link", "set", self.nodes[node].host_ifname, "down")

    def link_up(self, node: int) -> None:
        _ip("ip", "-n", self.switch, "link", "set", self.nodes[node].host_ifname, "up")

    def counters(self, node: int) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) of node ``node``'s own veth end, as the kernel counts them (Ethernet
        frames: payload plus TCP/IP and Ethernet headers)."""
        n = self.nodes[node]
        r = _ip("ip", "-n", n.netns, "-j", "-s", "link", "show", "dev", n.ifname)
        stats = json.loads(r.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    # -- processes ------------------------------------------------------------------------------------

    def find_process(self, node: int, arg: str, exclude: str = "torch.distributed.run") -> int | None:
        """The pid of a process in node ``node``'s namespace with ``arg`` among its arguments and not
        ``exclude`` (default: torchrun's agent, whose command line names its worker's script too), or
        None: how a fault injector finds the worker to kill."""
        for pid in _netns_pids(self.nodes[node].netns):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:  # ended since the listing
                continue
            if arg.encode() in argv and exclude.encode() not in argv:
                return pid
        return None

    def env(self, node: int) -> dict[str, str]:
        """Variables for a process on node ``node``: the interface gloo/NCCL/TensorPipe must use (a
        namespace has only ``lo`` and this one), the node's rank and address, node 0's address."""
        n = self.nodes[node]
        return {"GLOO_SOCKET_IFNAME": n.ifname, "NCCL_SOCKET_IFNAME": n.ifname, "TP_SOCKET_IFNAME": n.ifname,
                "DEFT_CLUSTER_NODE": str(n.index), "DEFT_CLUSTER_NODES": str(len(self.nodes)),
                "DEFT_CLUSTER_ADDR": n.address, "DEFT_CLUSTER_MASTER": self.nodes[0].address}

    def _full_env(self, node: int, env) -> dict[str, str]:
        extra = env(self.nodes[node]) if callable(env) else (env or {})
        return {**os.environ, **self.env(node), **{k: str(v) for k, v in extra.items()}}

    def popen(self, node: int, argv: Sequence[str], env: Mapping[str, str] | Callable[[Node], Mapping] | None = None,
              **kw) -> subprocess.Popen:
        """Start ``argv`` in node ``node``'s namespace, in a session of its own (so that a signal to it
        reaches its children); killed with its group when the cluster closes."""
        if not self._up:
            raise RuntimeError("the cluster is not up (use it inside 'with Cluster(...) as c:')")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.nodes[node].netns, *argv],
                             env=self._full_env(node, env), **kw)
        with self._lock:
            self._procs.append(p)
        return p

    def run(self, argvs: Sequence[Sequence[str]] | Callable[[Node], Sequence[str]], timeout: float,
            env: Mapping[str, str] | Callable[[Node], Mapping] | None = None,
            echo: bool = False) -> list[subprocess.CompletedProcess]:
        """Run one command per node, all at once, and wait at most ``timeout`` seconds for all of them.
        Returns each node's CompletedProcess (stdout, stderr as text). On timeout every process still
        running is killed and :class:`subprocess.TimeoutExpired` is raised, its ``results`` holding
        the same list (killed ones with returncode -9). ``echo`` copies each output line to this
        process's stdout/stderr as it comes, prefixed ``[n<i>]``."""
        cmds = [list(argvs(node)) for node in self.nodes] if callable(argvs) else [list(a) for a in argvs]
        if len(cmds) != len(self.nodes):
            raise ValueError(f"run needs one command per node ({len(self.nodes)}), got {len(cmds)}")
        procs = [self.popen(i, cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, cmd in enumerate(cmds)]
        outs: list[list[list[str]]] = [[[], []] for _ in procs]
        readers = []
        for i, p in enumerate(procs):
            for j, (stream, sink) in enumerate(((p.stdout, sys.stdout), (p.stderr, sys.stderr))):
                t = threading.Thread(target=_pump, args=(stream, outs[i][j], sink if echo else None, f"[n{i}] "),
                                     daemon=True)
                t.start()
                readers.append(t)
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            for p in procs:
                left = deadline - time.monotonic()
                try:
                    p.wait(timeout=max(left, 0.001))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            if timed_out or sys.exc_info()[0] is not None:
                for p in procs:
                    _kill_group(p)
            for t in readers:
                t.join(timeout=5)
            with self._lock:
                self._procs = [p for p in self._procs if p not in procs]
        results = [subprocess.CompletedProcess(cmds[i], p.returncode, "".join(outs[i][0]), "".join(outs[i][1]))
                   for i, p in enumerate(procs)]
        if timed_out:
            e = subprocess.TimeoutExpired(cmds[0], timeout, output="".join(r.stdout for r in results),
                                          stderr="".join(r.stderr for r in results))
            e.results = results
            raise e
        return results

    def torchrun_argv(self, node: int, script_and_args: Sequence[str], max_restarts: int = 0, port: int = 29400,
                      rdzv_id: str = "deft-cluster", join_timeout: int = 60, **kw) -> list[str]:
        """A multi-node ``torchrun`` for node ``node``: one process on each node, c10d rendezvous on
        node 0's address. Node 0 is told that it hosts the rendezvous store (``is_host``): torch would
        otherwise look for that address among the machine's host name's addresses, which a namespace
        does not have. Other keyword arguments become torchrun options (``monitor_interval=1`` ->
        ``--monitor-interval 1``)."""
        n = self.nodes[node]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(self.nodes)),
                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{self.nodes[0].address}:{port}", "--rdzv-id", rdzv_id,
                "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'},join_timeout={join_timeout}",
                "--local-addr", n.address, "--max-restarts", str(max_restarts)]
        for key, value in kw.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv + list(script_and_args)


def _pump(stream, lines: list[str], sink, tag: str) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        lines.append(line)
        if sink is not None:
            sink.write(tag + line)
            sink.flush()
    stream.close()


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# -- the shaping check: a bulk TCP transfer between two nodes, plain Python sockets ----------------------

_SINK = r"""
import json, socket, sys, time
addr, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
srv = socket.create_server((addr, port))
srv.settimeout(timeout)
conn, _ = srv.accept()
conn.settimeout(timeout)
buf = bytearray(1 << 20)
got = conn.recv_into(buf)
t0, first = time.perf_counter(), got
while got < size:
    n = conn.recv_into(buf)
    if n == 0:
        break
    got += n
t1 = time.perf_counter()
print(json.dumps({"bytes": got, "timed_bytes": got - first, "seconds": t1 - t0}))
"""

_SOURCE = r"""
import socket, sys, time
addr, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
while True:
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.02)
chunk = memoryview(bytes(1 << 20))
left = size
while left > 0:
    s.sendall(chunk[:min(left, len(chunk))])
    left -= min(left, len(chunk))
s.close()
"""


def bulk_transfer(cluster: Cluster, nbytes: int, sender: int = 0, receiver: int = 1, port: int = 5201,
                  timeout: float = 60.0) -> float:
    """Send ``nbytes`` over TCP from node ``sender`` to node ``receiver``; return the goodput in
    bits/s, timed at the receiver from its first read to its last (tbf lets the first burst through
    at once; TCP payload only, so about 3% under the link rate with 1500-byte frames)."""
    addr = cluster.nodes[receiver].address
    args = [addr, str(port), str(nbytes), str(timeout)]
    sink = cluster.popen(receiver, [sys.executable, "-c", _SINK, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    src = None
    try:
        src = cluster.popen(sender, [sys.executable, "-c", _SOURCE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        s_out, s_err = src.communicate(timeout=timeout)
        out, err = sink.communicate(timeout=timeout)
    finally:
        for p in (sink, src):
            if p is not None:
                _kill_group(p)
    if sink.returncode != 0 or src.returncode != 0:
        raise RuntimeError(f"bulk transfer failed: receiver {err.strip()[-300:]!r}, sender {s_err.strip()[-300:]!r}")
    r = json.loads(out)
    if r["bytes"] != nbytes:
        raise RuntimeError(f"bulk transfer received {r['bytes']} of {nbytes} bytes")
    return r["timed_bytes"] * 8 / r["seconds"]


# -- command line ---------------------------------------------------------------------------------------

#: The actions of ``deft-bench cluster ACTION``, a line each for ``--help``; ``run`` when none is named.
SUBCOMMANDS = {
    "run": "the default: CMD on every node (-- CMD ...; {rank} {addr} {nodes} {master} {ifname} replaced)",
    "torchrun": "torchrun on every node, its rendezvous on node 0 (-- train.py ...)",
    "check-shaping": "measure a bulk TCP transfer between two nodes at each rate against the rate set",
    "check": "say whether this machine can make a cluster (root, iproute2, namespaces, veth, tc tbf)",
    "cleanup": "remove every namespace and link of --prefix (what a killed run left behind)",
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the option (no usage), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _nodes_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{MAX_NODES}, got {text!r}") from None
    if not 1 <= v <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{MAX_NODES}, got {text!r}")
    return v


def _rate_arg(text: str) -> str | None:
    if text.lower() == "none":
        return None
    try:
        parse_rate(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tc rate such as 100mbit, 1gbit, 10gbit or 'none', got {text!r}") from None
    return text


def _prefix_arg(text: str) -> str:
    try:
        _check_prefix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, the description's lines (the list of actions) kept."""


def actions_help() -> str:
    """The actions, a line each, as ``deft-bench cluster --help`` shows them."""
    width = max(map(len, SUBCOMMANDS))
    return "\n".join(["actions (deft-bench cluster ACTION --help for an action's options):",
                      *(f"  {name:<{width}}  {line}" for name, line in SUBCOMMANDS.items())])


def build_parser(sub: str) -> argparse.ArgumentParser:
    if sub == "run":
        prog, usage = "deft-bench cluster", "%(prog)s [ACTION] [options] [-- CMD ...]"
        description = f"{__doc__.split(chr(10) * 2)[0]}\n\n{actions_help()}\n\nThe default action's options:"
    else:
        prog, usage, description = f"deft-bench cluster {sub}", None, SUBCOMMANDS[sub]
    p = OneLineParser(prog=prog, usage=usage, description=description, formatter_class=_HelpFormatter)
    p.add_argument("--prefix", type=_prefix_arg, default="dk", help="name prefix of every namespace and link")
    if sub in ("check", "cleanup"):
        return p
    p.add_argument("--nodes", type=_nodes_arg, default=2, help="number of nodes (namespaces)")
    p.add_argument("--bandwidth", type=_rate_arg, default="1gbit", help="every link's rate, both directions ('none': unshaped)")
    if sub == "check-shaping":
        p.add_argument("--megabytes", type=_positive_float, default=None,
                       help="size of the transfer (default: 0.5 s at the rate, at least 4 MB)")
        p.add_argument("--rates", type=_rate_arg, nargs="+", default=None,
                       help="check these rates in turn instead of --bandwidth")
        p.add_argument("--tolerance", type=_positive_float, default=0.10, help="allowed relative deviation from the rate")
    else:
        p.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds before every node's command is killed")
    if sub == "torchrun":
        p.add_argument("--port", type=int, default=29400, help="rendezvous port on node 0")
    return p


def _substitute(cmd: list[str], cluster: Cluster, node: Node) -> list[str]:
    values = {"{rank}": str(node.index), "{addr}": node.address, "{nodes}": str(len(cluster.nodes)),
              "{master}": cluster.nodes[0].address, "{ifname}": node.ifname}
    out = []
    for token in cmd:
        for key, value in values.items():
            token = token.replace(key, value)
        out.append(token)
    return out


def _check_shaping(args: argparse.Namespace) -> int:
    rates = args.rates or [args.bandwidth]
    if None in rates:
        print("deft-bench cluster check-shaping: error: --bandwidth/--rates: 'none' has no rate to check", file=sys.stderr)
        return 2
    failed = 0
    with Cluster(nodes=max(args.nodes, 2), bandwidth=rates[0], prefix=args.prefix) as c:
        for rate in rates:
            c.set_bandwidth(rate)
            bits = parse_rate(rate)
            nbytes = int(args.megabytes * 1e6) if args.megabytes else max(4_000_000, int(bits / 8 * 0.5))
            got = bulk_transfer(c, nbytes, timeout=max(30.0, 20 * nbytes * 8 / bits))
            dev = got / bits - 1
            ok = abs(dev) <= args.tolerance
            failed += not ok
            print(f"{rate}: {got / 1e6:.1f} Mb/s over {nbytes / 1e6:.1f} MB ({dev:+.1%} of the set rate) "
                  f"{'ok' if ok else 'OUTSIDE ' + format(args.tolerance, '.0%')}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        print(f"deft-bench cluster: error: unknown action {argv[0]!r}: choose from {', '.join(SUBCOMMANDS)} "
              "(none named: run, whose command follows '--'); deft-bench cluster --help describes them",
              file=sys.stderr)
        return 2
    sub = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1:]
    parser = build_parser(sub)
    args = parser.parse_args(argv)
    if sub in ("run", "torchrun") and not cmd:
        parser.error(f"no command: deft-bench cluster {'' if sub == 'run' else sub + ' '}[options] -- CMD ...")
    if sub not in ("run", "torchrun") and cmd:
        parser.error(f"{sub} takes no command after '--'")
    if sub == "cleanup":
        for item in cleanup(args.prefix):
            print(f"removed {item}")
        return 0
    missing = check_available()
    if missing:
        print(f"deft-bench cluster: {missing}", file=sys.stderr)
        return 2 if sub != "check" else 1
    if sub == "check":
        print("ok: root, iproute2, network namespaces, veth and tc tbf all work here")
        return 0
    try:
        if sub == "check-shaping":
            return _check_shaping(args)
        with Cluster(nodes=args.nodes, bandwidth=args.bandwidth, prefix=args.prefix) as c:
            if sub == "torchrun":
                make = lambda node: c.torchrun_argv(node.index, _substitute(cmd, c, node), port=args.port)  # noqa: E731
            else:
                make = lambda node: _substitute(cmd, c, node)  # noqa: E731
            try:
                results = c.run(make, timeout=args.timeout, echo=True)
            except subprocess.TimeoutExpired:
                print(f"deft-bench cluster: --timeout {args.timeout:g} s passed; every node's command was killed",
                      file=sys.stderr)
                return 124
            codes = [r.returncode for r in results]
            if any(codes):
                print(f"deft-bench cluster: exit codes per node {codes}", file=sys.stderr)
            return next((code for code in codes if code), 0) & 0xFF or (1 if any(codes) else 0)
    except KeyboardInterrupt as e:
        print(f"deft-bench cluster: interrupted ({e or 'SIGINT'}); the cluster was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
