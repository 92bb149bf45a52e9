"""Surviving node failures under ``torchrun --max-restarts``: a checkpoint file per rank that keeps
that rank's DEFT residuals, resumption from the newest checkpoint every rank holds, and errors that
say which peer was lost and how.

The recipe (docs/operations.md; examples/elastic_ddp.py runs it)::

    dist.init_process_group("gloo", timeout=timedelta(seconds=15))   # not torch's 30 minutes
    addresses = rank_addresses()
    model, optimizer, state = build()                                 # a new DDP model + DeftState
    start, _ = load_checkpoint(ckpt_dir, run_id=job, model=model, optimizer=optimizer, state=state)
    model.register_comm_hook(state, deft_hook)
    for step in range(start, steps):
        with naming_failures(step, addresses):
            train_step(step)                                          # batches a function of the step
        if (step + 1) % every == 0:
            save_checkpoint(ckpt_dir, step + 1, run_id=job, model=model, optimizer=optimizer, state=state)

**The checkpoint contract** (docs/operations.md, "Checkpoints"):

- *One file per rank*: ``directory/<run_id>/world<n>/step_<step>/rank<r>.pt``. Each rank's residual
  (what it selected but has not sent yet) differs; a checkpoint with rank 0's alone loses the
  others' (``DeftState.load_state_dict`` refuses another rank's file).
- *Shared or node-local directories alike*: a rank reads and writes only its own files. At start
  the ranks agree on what each of them holds by a collective over their own listings (not one
  rank's view of a shared disk), and resume from the newest step every rank holds.
- *A save cut short* (a rank killed while saving) leaves a newer step that some ranks hold and
  others do not: the ranks resume from the step before, with a warning, and remove it. Anything
  else that is missing (two or more newer steps, e.g. a node-local directory lost, or ranks started
  on other nodes than the ones that saved their files) is refused, naming what each rank holds, and
  nothing is removed.
- *The world size is part of a run*: a run whose newest files were saved by another number of
  ranks is refused, naming both sizes (the residuals are per rank, and a rank's are lost with its
  node's directory; docs/operations.md gives the reasons and what to do instead).
- *Run identity*: every file lives under and records its ``run_id``; two runs in one directory
  never see each other's files, and pruning keeps the ``keep`` newest steps of this run at or
  below the step being saved, so no folder of another run, nor a stale higher one, can make a
  fresh save delete itself. A run's steps only go forward: a save below a step this rank already
  holds for the run is refused (resume with :func:`load_checkpoint` first).
- *Durable and atomic*: a file is written to a temporary name, flushed and fsynced, renamed, and
  its folder fsynced, so a rank killed (or a node losing power) while saving leaves either the
  whole file or none.
- *Trusted as data only*: files are read with ``torch.load(weights_only=True)`` (a directory on a
  shared filesystem is an input like any other, and a full unpickler runs whatever a writer put
  there); a save whose contents (``extra`` included) that loader would refuse raises instead.

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
from dataclasses import dataclass
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
_WORLD_DIR = re.compile(r"world(\d+)")
_RANK_FILE = re.compile(r"rank(\d+)\.pt")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMAT = 2  # 1: directory/step_<s>/rank<r>.pt, no run identity, read with the full unpickler


def _check_dir(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory)


def _check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str (the run's identity, e.g. torchrun's --rdzv-id), got "
                        f"{type(run_id).__name__}")
    if not _RUN_ID.fullmatch(run_id) or _STEP_DIR.fullmatch(run_id):
        raise ValueError(f"run_id must be 1-128 letters, digits, '.', '_' or '-', not starting with '.', '_' "
                         f"or '-', and not step_<number> (it names a folder), got {run_id!r}")
    return run_id


def _module(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (DDP-wrapped or not), got {type(model).__name__}")
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _check_parts(optimizer: Any, state: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if state is not None and not isinstance(state, DeftState):
        raise TypeError(f"state must be a DeftState or None, got {type(state).__name__}")


def _world_dir(root: Path, run_id: str, n: int) -> Path:
    return root / run_id / f"world{n}"


def _step_dir(world_dir: Path, step: int) -> Path:
    return world_dir / f"step_{step:08d}"


def _steps(world_dir: Path) -> list[int]:
    """The step folders under ``world_dir``, ascending (empty when it does not exist)."""
    if not world_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in world_dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())


def _temporary(path: Path) -> Path:
    """Where a save writes ``path`` before renaming it."""
    return path.with_name(f".{path.name}.tmp")


def _fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a new file, a rename, a new folder) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p path``, each new folder's entry fsynced in its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)  # another rank may make it at the same time (shared directory)
        _fsync_dir(folder.parent)


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically and durably: a temporary file, flushed and fsynced,
    checked to load with ``weights_only=True``, renamed over ``path``, the folder fsynced."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
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
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Remove this rank's file (and a temporary one left by a save cut short), then its folder once
    every rank has removed its own."""
    path.unlink(missing_ok=True)
    _temporary(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other ranks' files still there
        path.parent.rmdir()


def save_checkpoint(directory: str | os.PathLike, step: int, *, run_id: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: DeftState | None = None,
                    extra: Any = None, keep: int = 2, group: dist.ProcessGroup | None = None) -> Path:
    """Write this rank's file ``directory/<run_id>/world<n>/step_<step>/rank<r>.pt`` (model, optimizer,
    ``state``'s ``state_dict()``, ``extra``) atomically and durably (module docstring); call it on
    every rank at the same step, between iterations. ``run_id`` names the run (the same across its
    restarts, another for another run: torchrun's ``--rdzv-id`` or the scheduler's job id). ``extra``
    must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings, and lists, tuples and
    dicts of them), else a ``TypeError`` names what does not.

    Removes this rank's files of this run's steps below ``step`` but the ``keep - 1`` newest
    (``keep >= 2``: when a rank saves step s, every rank has finished saving the step before, whose
    collectives it has passed, so that one is complete everywhere). Steps above ``step`` of this run
    held by this rank are refused (a run goes forward; :func:`load_checkpoint` removes a save cut
    short). Returns the file's path."""
    root = _check_dir(directory)
    step = check_int("step", step, 0)
    run_id = _check_run_id(run_id)
    keep = check_int("keep", keep, 2)
    module = _module(model)
    _check_parts(optimizer, state)
    check_group("group", group)
    rank, n = world(group)
    world_dir = _world_dir(root, run_id, n)
    own = [s for s in _steps(world_dir) if (_step_dir(world_dir, s) / f"rank{rank}.pt").is_file()]
    if own and own[-1] > step:
        raise ValueError(f"run {run_id!r} in {root} already holds step {own[-1]} for rank {rank} of {n}, above step "
                         f"{step}: a run's steps only go forward; resume it with load_checkpoint (which removes a "
                         "save cut short), or give a new run its own run_id")
    folder = _step_dir(world_dir, step)
    _make_dirs(folder)
    path = folder / f"rank{rank}.pt"
    _write(path, {"format": _FORMAT, "run_id": run_id, "step": step, "rank": rank, "world_size": n,
                  "model": module.state_dict(), "optimizer": None if optimizer is None else optimizer.state_dict(),
                  "deft": None if state is None else state.state_dict(), "extra": extra})
    older = [s for s in own if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        _remove(_step_dir(world_dir, old) / f"rank{rank}.pt")
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


def complete_checkpoints(directory: str | os.PathLike, run_id: str, world_size: int) -> list[int]:
    """The steps, ascending, of run ``run_id`` at ``world_size`` ranks whose folder holds every rank's
    file, as this process sees ``directory`` (a tool for a shared directory; :func:`load_checkpoint`
    does not use it: the ranks there agree over their own listings)."""
    root = _check_dir(directory)
    run_id = _check_run_id(run_id)
    world_size = check_int("world_size", world_size, 1)
    world_dir = _world_dir(root, run_id, world_size)
    return [s for s in _steps(world_dir)
            if all((_step_dir(world_dir, s) / f"rank{r}.pt").is_file() for r in range(world_size))]


@dataclass
class _Listing:
    """What one rank holds of a run at the current world size: the steps with its own file, the steps
    whose folder it sees holding any rank's file (its own included), the newest step with a file
    saved at another world size (``-1``, ``0``: none), and the newest step folder of the layout
    before run identities, ``directory/step_<s>`` (``-1``: none)."""

    own: list[int]
    seen: list[int]
    other_step: int = -1
    other_size: int = 0
    legacy: int = -1


def _holds_a_rank_file(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(_RANK_FILE.fullmatch(e.name) for e in entries)  # stops at the first: one entry, mostly


def _my_listing(root: Path, run_id: str, rank: int, n: int) -> _Listing:
    """This rank's listing of its own view of ``root``; removes its temporary files left by saves cut
    short on the way."""
    world_dir = _world_dir(root, run_id, n)
    own, seen = [], []
    for s in _steps(world_dir):
        path = _step_dir(world_dir, s) / f"rank{rank}.pt"
        _temporary(path).unlink(missing_ok=True)  # no save of this rank runs now: a dead one's leftover
        mine = path.is_file()
        if mine:
            own.append(s)
        if mine or _holds_a_rank_file(path.parent):
            seen.append(s)
    listing = _Listing(own, seen)
    run_dir = root / run_id
    sizes = [int(m.group(1)) for p in run_dir.iterdir() if (m := _WORLD_DIR.fullmatch(p.name))] \
        if run_dir.is_dir() else []
    for size in sizes:
        other = _world_dir(root, run_id, size)
        held = [s for s in _steps(other) if _holds_a_rank_file(_step_dir(other, s))] if size != n else []
        if held and held[-1] > listing.other_step:
            listing.other_step, listing.other_size = held[-1], size
    listing.legacy = max(_steps(root), default=-1)
    return listing


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device of the tensors ``group``'s backend takes, chosen as torch's own object collectives
    (``all_gather_object``) choose it: the CPU where a backend of the group takes CPU tensors (gloo),
    else the current device of its accelerator (NCCL: the current CUDA device, which an NCCL training
    script sets with ``torch.cuda.set_device``)."""
    kind = dist.distributed_c10d._get_object_coll_device(group)
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def _gather_listings(listing: _Listing, group: dist.ProcessGroup | None) -> list[_Listing]:
    """Every rank's listing, in rank order: two collectives on the group's device (the longest
    listing's length, then the listings padded to it; a step seen is sent as ``2 step + own``)."""
    head = 4  # count, other_step, other_size, legacy
    device = _collective_device(group)
    own = set(listing.own)
    codes = [2 * s + (s in own) for s in listing.seen]
    width = torch.tensor([len(codes)], dtype=torch.int64, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    row = [len(codes), listing.other_step, listing.other_size, listing.legacy] + codes
    mine = torch.tensor(row + [-1] * (head + int(width.item()) - len(row)), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    listings = []
    for count, other_step, other_size, legacy, *codes in (t.tolist() for t in gathered):
        codes = codes[:count]
        listings.append(_Listing([c // 2 for c in codes if c % 2], [c // 2 for c in codes], other_step, other_size,
                                 legacy))
    return listings


def _holdings(listing: _Listing) -> str:
    foreign = sorted(set(listing.seen) - set(listing.own))
    return f"{listing.own}" + (f" (and other ranks' files of {foreign})" if foreign else "")


def _agree(listings: list[_Listing], run_id: str, where: Path) -> tuple[int, int | None]:
    """From every rank's listing, the same on every rank: the step to resume from (``-1``: none) and
    the step of a save cut short to remove (``None``: none); raises ``ValueError`` where resuming
    would lose progress silently (module docstring)."""
    n = len(listings)
    legacy = max(li.legacy for li in listings)
    if legacy >= 0:
        raise ValueError(f"{where} holds checkpoints in the layout of deft_kernels before run identities "
                         f"({where}/step_<step>/rank<r>.pt, newest step {legacy}), which load_checkpoint no longer "
                         "reads (they name no run); to resume from one, load each rank's file with torch.load(path, "
                         "weights_only=True) into its model, optimizer and DeftState and save it with save_checkpoint "
                         "under a run_id; or move the step_* folders away to start afresh")
    newest = max(set(listings[0].own).intersection(*(li.own for li in listings[1:])), default=-1)
    other = max(listings, key=lambda li: li.other_step)
    if other.other_step > newest:
        raise ValueError(f"run {run_id!r} in {where}: its newest checkpoint files, of step {other.other_step}, were "
                         f"saved by a world of {other.other_size} ranks, and this world has {n}: a DEFT checkpoint "
                         f"holds one residual per rank and resumes only at the world size that saved it; relaunch "
                         f"with {other.other_size} ranks (torchrun --nnodes with min = max), or start a new run "
                         "(another run_id) from its model and optimizer (docs/operations.md, Checkpoints)")
    newer = sorted({s for li in listings for s in li.seen if s > newest})
    # A save cut short: one step above the newest that all hold, where some ranks hold their own file.
    if not newer or (len(newer) == 1 and any(newer[0] in li.own for li in listings)):
        return newest, (newer[0] if newer else None)
    held = "; ".join(f"rank {r}: {_holdings(li)}" for r, li in enumerate(listings[:8])) + ("; ..." if n > 8 else "")
    raise ValueError(f"run {run_id!r} in {where}: the ranks hold their own files of different steps ({held}); the "
                     f"newest all hold is {'none' if newest < 0 else newest}, and the newer steps {newer[:8]} are not "
                     "a save cut short: files are missing (a node-local directory lost or not mounted, or ranks "
                     "started on other nodes than the ones that saved their files). Nothing was removed; restore "
                     f"the files, or remove the step folders above {max(newest, 0)} under "
                     f"{where / run_id / f'world{n}'} to resume from {'the start' if newest < 0 else f'step {newest}'}")


def _load_own(path: Path, run_id: str, step: int, rank: int, n: int) -> dict[str, Any]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    found = tuple(saved.get(k) for k in ("run_id", "step", "rank", "world_size")) if isinstance(saved, dict) else None
    if found != (run_id, step, rank, n):
        raise ValueError(f"{path} holds (run_id, step, rank, world_size) = {found}, expected {(run_id, step, rank, n)}: "
                         "a file moved or copied from elsewhere")
    return saved


def _restore(saved: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             state: DeftState | None) -> None:
    step = saved["step"]
    module.load_state_dict(saved["model"])
    if optimizer is not None:
        if saved["optimizer"] is None:
            raise ValueError(f"the checkpoint of step {step} holds no optimizer state")
        optimizer.load_state_dict(saved["optimizer"])
    if state is not None:
        if saved["deft"] is None:
            raise ValueError(f"the checkpoint of step {step} holds no DeftState")
        state.load_state_dict(saved["deft"])


def _failed_ranks(ok: bool, group: dist.ProcessGroup | None) -> list[int]:
    """The ranks for which ``ok`` is False (one all-gather on the group's device)."""
    mine = torch.tensor([int(ok)], dtype=torch.int64, device=_collective_device(group))
    flags = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, mine, group=group)
    return [r for r, f in enumerate(flags) if not int(f.item())]


def load_checkpoint(directory: str | os.PathLike, *, run_id: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: DeftState | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[int, Any]:
    """Load this rank's file of run ``run_id``'s newest step that every rank of ``group`` holds into
    ``model``, ``optimizer`` and ``state``; returns ``(step, extra)``, or ``(0, None)`` when there
    is none. A collective: call it on every rank (the ranks gather their own listings of
    ``directory``, which may be shared or node-local, on the group's device, as its backend requires:
    the current CUDA device under NCCL). Files are read with ``torch.load(weights_only=True)``.

    A save cut short (a newer step held by some ranks only) is removed, with a ``RuntimeWarning``;
    a world size other than the one that saved the run's newest files, or missing files that a save
    cut short does not explain, raise a ``ValueError`` on every rank, naming what each holds, and
    remove nothing; a rank that cannot read or apply its file makes every rank raise. Load before
    registering ``state`` on a freshly built DDP model. Under torchrun, warns once when its
    environment lacks :data:`RESTART_ENV` (:func:`check_restart_store`)."""
    root = _check_dir(directory)
    run_id = _check_run_id(run_id)
    module = _module(model)
    _check_parts(optimizer, state)
    check_group("group", group)
    check_restart_store()
    rank, n = world(group)
    listing = _my_listing(root, run_id, rank, n)
    distributed = dist.is_available() and dist.is_initialized()
    listings = _gather_listings(listing, group) if distributed else [listing]
    step, cut_short = _agree(listings, run_id, root)
    extra, error = None, None
    if step >= 0:
        try:
            saved = _load_own(_step_dir(_world_dir(root, run_id, n), step) / f"rank{rank}.pt", run_id, step, rank, n)
            _restore(saved, module, optimizer, state)
            extra = saved["extra"]
        except Exception as e:  # noqa: BLE001 -- every rank must learn of it, below
            error = e
    failed = _failed_ranks(error is None, group) if distributed else []
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"run {run_id!r}: rank(s) {failed} could not load their checkpoint of step {step} (see their "
                           "error); this rank loaded its own, but training cannot go on without theirs")
    if cut_short is not None:
        holders = [r for r, li in enumerate(listings) if cut_short in li.own]
        warnings.warn(f"run {run_id!r} in {root}: step {cut_short} is incomplete (held by rank(s) {holders[:8]} of {n} "
                      f"only: a save cut short); resuming from {'the start' if step < 0 else f'step {step}'} and "
                      f"removing it", RuntimeWarning, stacklevel=2)
        if cut_short in listing.own:  # every rank removes its own file: the folder goes with the last
            _remove(_step_dir(_world_dir(root, run_id, n), cut_short) / f"rank{rank}.pt")
    return max(step, 0), extra


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
