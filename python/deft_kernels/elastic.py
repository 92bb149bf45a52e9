"""Surviving node failures under ``torchrun --max-restarts``: a checkpoint file per rank that keeps
that rank's DEFT residuals, resumption from the newest checkpoint every rank completed, and errors
that say which peer was lost and how.

The recipe (docs/operations.md; examples/elastic_ddp.py runs it)::

    dist.init_process_group("gloo", timeout=timedelta(seconds=15))   # not torch's 30 minutes
    addresses = rank_addresses()
    model, optimizer, state = build()                                 # a new DDP model + DeftState
    start, _ = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, state=state)
    model.register_comm_hook(state, deft_hook)
    for step in range(start, steps):
        with naming_failures(step, addresses):
            train_step(step)                                          # batches a function of the step
        if (step + 1) % every == 0:
            save_checkpoint(ckpt_dir, step + 1, model=model, optimizer=optimizer, state=state)

Why each rank saves its own file: each rank's residual (what it selected but has not sent yet)
differs; a checkpoint with rank 0's alone loses the others' (``DeftState.load_state_dict`` refuses
another rank's file). A checkpoint ``step_<step>`` is complete when every rank's file is there:
files are written to a temporary name and renamed, so a rank killed while saving leaves no partial
file. At start the ranks agree (one all-reduce, on the device the group's backend takes: the current
CUDA device under NCCL) on the newest step complete for all of them. Files are read with
``torch.load(weights_only=True)`` (a directory on a shared filesystem is an input like any other, and
a full unpickler runs whatever a writer put there); a save whose contents that loader would refuse
raises instead.

What a peer's loss looks like (gloo, measured on the emulated cluster, docs/operations.md): a peer
whose process dies closes its connections and the others raise at once ("Connection reset by peer",
naming its address); a peer whose link goes down sends nothing and the others raise only when the
process group's timeout has passed, naming nobody. :func:`naming_failures` turns both into a
:class:`PeerFailure` that names the step, the peer where gloo says which, and the likely cause.
"""

import contextlib
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._integration import check_group, check_int, world
from .hook import DeftState

__all__ = ["save_checkpoint", "load_checkpoint", "complete_checkpoints", "rank_addresses", "naming_failures",
           "PeerFailure", "check_restart_store", "RESTART_ENV"]

#: The environment torchrun needs for restarts that reconnect (docs/operations.md): a fresh store per
#: rendezvous round instead of the one torchrun shares across rounds.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
_warned_store = False

_STEP_DIR = re.compile(r"step_(\d+)")


def _check_dir(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory)


def _module(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (DDP-wrapped or not), got {type(model).__name__}")
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _check_parts(optimizer: Any, state: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if state is not None and not isinstance(state, DeftState):
        raise TypeError(f"state must be a DeftState or None, got {type(state).__name__}")


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file, checked to load with
    ``weights_only=True`` before it is renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"the checkpoint holds {sorted(unsafe)}, which torch.load(weights_only=True) refuses, "
                            "so load_checkpoint could not read it: keep extra (and any custom optimizer state) to "
                            "tensors, numbers, strings and lists, tuples and dicts of them, or allow the types with "
                            "torch.serialization.add_safe_globals in the saving and the loading process")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: DeftState | None = None,
                    extra: Any = None, keep: int = 2, group: dist.ProcessGroup | None = None) -> Path:
    """Write this rank's file ``directory/step_<step>/rank<r>.pt`` (model, optimizer, ``state``'s
    ``state_dict()``, ``extra``), atomically; call it on every rank at the same step, between
    iterations. ``extra`` must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    and lists, tuples and dicts of them), else a ``TypeError`` names what does not. Removes this
    rank's files of all but the ``keep`` newest steps (``keep >= 2``: when a rank saves step s, every
    rank has finished saving the step before, whose collectives it has passed, so that one is
    complete). Returns the file's path."""
    root = _check_dir(directory)
    step = check_int("step", step, 0)
    keep = check_int("keep", keep, 2)
    module = _module(model)
    _check_parts(optimizer, state)
    check_group("group", group)
    rank, n = world(group)
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.pt"
    _write(path, {"step": step, "rank": rank, "world_size": n, "model": module.state_dict(),
                  "optimizer": None if optimizer is None else optimizer.state_dict(),
                  "deft": None if state is None else state.state_dict(), "extra": extra})
    for old in sorted(_step_dirs(root))[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            (root / f"step_{old:08d}" / f"rank{rank}.pt").unlink()
        with contextlib.suppress(OSError):  # empty once every rank removed its file
            (root / f"step_{old:08d}").rmdir()
    return path


def check_restart_store(environ: dict | None = None) -> bool:
    """Whether this worker's torchrun can restart its group safely; warns once when it cannot.

    By default (torch >= 2.4) torchrun's agents share one TCP store across rendezvous rounds and
    give the workers no per-round prefix for it (``TORCHELASTIC_USE_AGENT_STORE=True``). Each agent
    counts its own restarts, and those counts diverge as soon as one agent restarts its workers
    because a node joined rather than because its worker failed; then a restarted worker can read
    the previous round's gloo addresses from the store and fail to connect, which fails the round,
    and so on until ``--max-restarts`` is spent. Measured on 4 emulated nodes: after the first fault
    every round failed with "Connection refused" to a dead worker's address; with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment (rank 0's worker hosts a new
    store each round) the same soak run recovered from 8 faults (docs/operations.md). Called by
    :func:`load_checkpoint`; returns False (after warning) under torchrun with ``--max-restarts``
    > 0 and the shared store, True otherwise."""
    global _warned_store
    env = os.environ if environ is None else environ
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts <= 0:
        return True
    if not _warned_store:
        _warned_store = True
        warnings.warn("torchrun shares one store across restarts (TORCHELASTIC_USE_AGENT_STORE=True): a "
                      "restarted group can read the previous round's addresses and fail to reconnect, "
                      "round after round; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                      "environment (deft_kernels.elastic.RESTART_ENV, docs/operations.md)", stacklevel=3)
    return False


def _step_dirs(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]


def complete_checkpoints(directory: str | os.PathLike, world_size: int) -> list[int]:
    """The steps, ascending, whose folder holds the files of all ``world_size`` ranks."""
    root = _check_dir(directory)
    world_size = check_int("world_size", world_size, 1)
    return sorted(s for s in _step_dirs(root)
                  if all((root / f"step_{s:08d}" / f"rank{r}.pt").is_file() for r in range(world_size)))


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device of the tensors ``group``'s backend takes, chosen as torch's own object collectives
    (``all_gather_object``) choose it: the CPU where a backend of the group takes CPU tensors (gloo),
    else the current device of its accelerator (NCCL: the current CUDA device, which an NCCL training
    script sets with ``torch.cuda.set_device``)."""
    kind = dist.distributed_c10d._get_object_coll_device(group)
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: DeftState | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[int, Any]:
    """Load this rank's file of the newest checkpoint that every rank of ``group`` has complete (the
    ranks agree with one all-reduce on the group's device, as its backend requires: the current CUDA
    device under NCCL; so it is a collective: call it on every rank) into ``model``, ``optimizer``
    and ``state``; returns ``(step, extra)``, or ``(0, None)`` when there is none. Files are read
    with ``torch.load(weights_only=True)``.
    Load before registering ``state`` on a freshly built DDP model. Under torchrun, warns once when
    its environment lacks :data:`RESTART_ENV` (:func:`check_restart_store`)."""
    root = _check_dir(directory)
    module = _module(model)
    _check_parts(optimizer, state)
    check_group("group", group)
    rank, n = world(group)
    check_restart_store()
    steps = complete_checkpoints(root, n)
    newest = steps[-1] if steps else -1
    if dist.is_available() and dist.is_initialized():
        agreed = torch.tensor([newest], dtype=torch.int64, device=_collective_device(group))
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        newest = int(agreed.item())
    if newest < 0:
        return 0, None
    saved = torch.load(root / f"step_{newest:08d}" / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    if (saved["rank"], saved["world_size"]) != (rank, n):
        raise ValueError(f"{root}/step_{newest:08d}/rank{rank}.pt was saved by rank {saved['rank']} of "
                         f"{saved['world_size']}, this is rank {rank} of {n}")
    module.load_state_dict(saved["model"])
    if optimizer is not None:
        if saved["optimizer"] is None:
            raise ValueError(f"the checkpoint of step {newest} holds no optimizer state")
        optimizer.load_state_dict(saved["optimizer"])
    if state is not None:
        if saved["deft"] is None:
            raise ValueError(f"the checkpoint of step {newest} holds no DeftState")
        state.load_state_dict(saved["deft"])
    return newest, saved["extra"]


def rank_addresses(group: dist.ProcessGroup | None = None) -> list[str]:
    """Every rank's IPv4 address towards ``MASTER_ADDR`` (the interface its gloo traffic uses when the
    nodes share one network), in rank order: one all-gather at start, so that a later error naming
    an address names the rank."""
    check_group("group", group)
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master, 9))  # UDP: picks the route, sends nothing
            mine = s.getsockname()[0]
        except OSError:
            mine = "?"
    _, n = world(group)
    if n == 1:
        return [mine]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, mine, group=group)
    return out


class PeerFailure(RuntimeError):
    """A collective failed because a peer was lost. ``step``: the iteration; ``peer``: the rank gloo
    named (``None`` when it names none); ``cause``: ``"closed"`` (the peer's process died or closed
    its connections) or ``"timeout"`` (nothing from a peer for the whole process-group timeout: its
    node unreachable, e.g. a link down, or hung) or ``"other"``; ``elapsed``: seconds into the step."""

    def __init__(self, message: str, *, step: int, peer: int | None, cause: str, elapsed: float) -> None:
        super().__init__(message)
        self.step, self.peer, self.cause, self.elapsed = step, peer, cause, elapsed


_CLOSED = ("connection reset", "connection closed", "broken pipe", "end of file", "connection refused")
_ADDRESS = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]")


@contextlib.contextmanager
def naming_failures(step: int, addresses: list[str] | None = None) -> Iterator[None]:
    """Re-raise a ``torch.distributed`` error inside the block as a :class:`PeerFailure` whose message
    names this rank, ``step``, the peer (by rank, from ``addresses`` = :func:`rank_addresses`, where
    gloo names an address) and the cause; other exceptions pass through unchanged."""
    step = check_int("step", step, 0)
    if addresses is not None and (not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses)):
        raise TypeError("addresses must be a list of str (rank_addresses()) or None")
    start = time.monotonic()
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, PeerFailure):
            raise
        elapsed = time.monotonic() - start
        text = str(e)
        lower = text.lower()
        if any(k in lower for k in _CLOSED):
            cause = "closed"
        elif "timed out" in lower or "timeout" in lower:
            cause = "timeout"
        else:
            raise  # not a lost peer (a bad input, a bug): unchanged
        m = _ADDRESS.search(text)
        peer = addresses.index(m.group(1)) if m and addresses and m.group(1) in addresses else None
        rank = dist.get_rank() if dist.is_initialized() else 0
        who = f"rank {peer} ({m.group(1)})" if peer is not None else (f"the peer at {m.group(1)}" if m else "a peer")
        if cause == "closed":
            what = f"{who} closed its connection: its process died, was killed or restarted"
        else:
            what = (f"nothing came from {who} within the process group's timeout: its node is unreachable "
                    "(link down) or stopped")
        raise PeerFailure(f"rank {rank}, step {step}, {elapsed:.2f} s into the step: {what} "
                          f"[gloo: {text.strip().splitlines()[0][:300]}]", step=step, peer=peer, cause=cause,
                          elapsed=elapsed) from e
