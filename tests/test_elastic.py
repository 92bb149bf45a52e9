"""deft_kernels.elastic without a cluster: the checkpoint contract (per-rank files, shared or
node-local directories agreed over the ranks' own listings, saves cut short, world sizes, run
identity, pruning, durability, weights-only loading, the collectives on the group's device), the
DeftState restored so that training continues exactly, the errors naming a lost peer (from the
messages gloo gave on the emulated cluster), and bad arguments. Multi-rank cases run on 2 gloo
ranks; tests/test_cluster_faults.py runs the whole recipe with real faults."""

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook
from deft_kernels import elastic
from deft_kernels.elastic import (RESTART_ENV, PeerFailure, check_restart_store, complete_checkpoints, load_checkpoint,
                                  naming_failures, rank_addresses, save_checkpoint)
from deft_kernels.sparsifiers import SPARSIFIERS

from multiproc import gloo_rank, run

# What gloo raised on the emulated cluster (2 nodes, timeout 5 s): a peer's process SIGKILLed, its link down.
RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [198.18.0.2]:59031: "
         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
TIMEOUT = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"

RUN = "job1"
KWARGS = {"threshold": {"threshold": 0.05}}


def _build(sparsifier="deft"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = DeftState(sparsifier=sparsifier, density=0.05, warmup_steps=2, **KWARGS.get(sparsifier, {}))
    return model, opt, state


def _train(model, opt, state, steps, ckpt=None, every=3):
    ddp = DDP(model)
    ddp.register_comm_hook(state, deft_hook)
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        if ckpt is not None and (step + 1) % every == 0:
            save_checkpoint(ckpt, step + 1, run_id=RUN, model=ddp, optimizer=opt, state=state, extra={"step": step + 1})


def _file(root, step, rank=0, n=1, run_id=RUN):
    return Path(root) / run_id / f"world{n}" / f"step_{step:08d}" / f"rank{rank}.pt"


def test_resume_from_checkpoint_equals_not_stopping(world_of_one, tmp_path):
    model, opt, state = _build()
    _train(model, opt, state, range(10), ckpt=tmp_path)
    straight = [p.detach().clone() for p in model.parameters()]
    assert complete_checkpoints(tmp_path, RUN, 1) == [6, 9]  # keep=2: step 3 removed
    assert not list(tmp_path.glob("**/.*.tmp"))

    model, opt, state = _build()
    step, extra = load_checkpoint(tmp_path, run_id=RUN, model=model, optimizer=opt, state=state)
    assert (step, extra) == (9, {"step": 9}) and state.iter == 9 and state.sparsifiers
    _train(model, opt, state, range(9, 10))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight))


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_files_load_with_weights_only(world_of_one, tmp_path, name):
    """Every sparsifier's state, past the warm-up, with an optimizer holding momentum: nothing in the
    file needs more than torch.load(weights_only=True)."""
    model, opt, state = _build(name)
    _train(model, opt, state, range(4))
    path = save_checkpoint(tmp_path, 4, run_id=RUN, model=model, optimizer=opt, state=state,
                           extra={"step": 4, "losses": [0.5, 0.25], "seed": torch.tensor([7])})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    saved = torch.load(path, weights_only=True)
    assert saved["deft"]["buckets"] and saved["extra"]["losses"] == [0.5, 0.25]
    model, opt, state = _build(name)
    assert load_checkpoint(tmp_path, run_id=RUN, model=model, optimizer=opt, state=state)[0] == 4 and state.iter == 4


_RAN = []


def _mark_ran():
    _RAN.append(True)
    return "pwned"


class _Payload:
    """What a writer with access to a shared checkpoint folder could plant: unpickling it calls a function."""

    def __reduce__(self):
        return (_mark_ran, ())


def test_loading_runs_no_pickled_code(world_of_one, tmp_path):
    model = _build()[0]
    save_checkpoint(tmp_path, 3, run_id=RUN, model=model)
    path = _file(tmp_path, 3)
    saved = torch.load(path, weights_only=True)
    torch.save(dict(saved, extra=_Payload()), path)  # rewritten behind save_checkpoint's back
    _RAN.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path, run_id=RUN, model=_build()[0])
    assert not _RAN


class _Note:
    def __init__(self, text):
        self.text = text


def test_save_refuses_what_weights_only_cannot_load(world_of_one, tmp_path):
    model = _build()[0]
    with pytest.raises(TypeError, match=r"_Note.*torch.load\(weights_only=True\) refuses"):
        save_checkpoint(tmp_path, 3, run_id=RUN, model=model, extra=_Note("hi"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # neither the file nor its temporary
    with pytest.raises(AttributeError, match="pickle"):  # what pickle cannot write at all
        save_checkpoint(tmp_path, 3, run_id=RUN, model=model, extra=lambda: None)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with torch.serialization.safe_globals([_Note]):  # allowed where the loader allows it too
        save_checkpoint(tmp_path, 3, run_id=RUN, model=model, extra=_Note("hi"))
        assert load_checkpoint(tmp_path, run_id=RUN, model=model)[1].text == "hi"


def test_saves_are_fsynced_before_and_after_the_rename(world_of_one, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    path = save_checkpoint(tmp_path / "new", 3, run_id=RUN, model=_build()[0])
    tmp = str(path.with_name(f".{path.name}.tmp"))
    i = events.index(("replace", tmp, str(path)))
    assert ("fsync", tmp) in events[:i]  # the data, before the rename
    assert ("fsync", str(path.parent)) in events[i + 1:]  # the rename, after it
    # each new folder's entry in its parent (tmp_path/new, its run, world and step folders)
    for folder in (tmp_path / "new", tmp_path / "new" / RUN, path.parent.parent, path.parent):
        assert ("fsync", str(folder.parent)) in events[:i]


def test_collective_device_follows_the_backend(world_of_one, monkeypatch):
    assert elastic._collective_device(None) == torch.device("cpu")  # gloo
    monkeypatch.setattr(dist.distributed_c10d, "_get_object_coll_device", lambda group: "cuda")  # what NCCL gives
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert elastic._collective_device(None) == torch.device("cuda", 3)


class _Collective(Exception):
    pass


def test_load_agrees_on_the_groups_device(world_of_one, tmp_path, monkeypatch):
    """A stand-in for a backend that takes only its own device's tensors (NCCL rejects CPU tensors):
    every collective of load_checkpoint must be handed a tensor on the group's device (here 'meta')."""
    devices = []

    def nccl_like(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
        devices.extend(t.device.type for t in tensors + [a for a in args if isinstance(a, torch.Tensor)])
        raise _Collective

    monkeypatch.setattr(elastic, "_collective_device", lambda group: torch.device("meta"), raising=False)
    monkeypatch.setattr(dist, "all_reduce", nccl_like)
    monkeypatch.setattr(dist, "all_gather", nccl_like)
    with pytest.raises(_Collective):
        load_checkpoint(tmp_path, run_id=RUN, model=_build()[0])
    assert devices and set(devices) == {"meta"}


def test_two_runs_in_one_directory_never_mix(world_of_one, tmp_path):
    model = _build()[0]
    for step in (100, 200):  # an earlier run's folders, higher than anything the new one saves
        save_checkpoint(tmp_path, step, run_id="old", model=model, extra=f"old {step}")
    for step in (5, 10):
        save_checkpoint(tmp_path, step, run_id="new", model=model, extra=f"new {step}")
    save_checkpoint(tmp_path, 15, run_id="other", model=model, extra="other 15")
    assert complete_checkpoints(tmp_path, "new", 1) == [5, 10]  # the fresh saves kept (keep=2)
    assert complete_checkpoints(tmp_path, "old", 1) == [100, 200]  # and the old run untouched
    assert load_checkpoint(tmp_path, run_id="new", model=model) == (10, "new 10")
    assert load_checkpoint(tmp_path, run_id="old", model=model) == (200, "old 200")
    assert load_checkpoint(tmp_path, run_id="unseen", model=model) == (0, None)

    # A run goes forward: a save below a step it holds would start a second history in it.
    with pytest.raises(ValueError, match="already holds step 10 for rank 0 of 1, above step 5"):
        save_checkpoint(tmp_path, 5, run_id="new", model=model)

    # A file that records another run (copied or moved by hand) is refused.
    os.replace(_file(tmp_path, 15, run_id="other"), _file(tmp_path, 10, run_id="new"))
    with pytest.raises(ValueError, match=r"holds \(run_id, step, rank, world_size\) = \('other', 15, 0, 1\)"):
        load_checkpoint(tmp_path, run_id="new", model=model)


def test_the_decision_from_the_ranks_listings():
    """The rules every rank applies alike to the gathered listings (own files; steps seen holding
    any rank's file; the newest step of another world size)."""
    L, agree, where = elastic._Listing, elastic._agree, Path("/ckpt")
    assert agree([L([5, 10], [5, 10]), L([5, 10], [5, 10])], RUN, where) == (10, None)
    assert agree([L([5, 10, 15], [5, 10, 15]), L([5, 10], [5, 10, 15])], RUN, where) == (10, 15)  # cut short
    assert agree([L([5], [5]), L([], [])], RUN, where) == (-1, 5)  # the first save cut short
    assert agree([L([], []), L([], [])], RUN, where) == (-1, None)
    with pytest.raises(ValueError, match=r"rank 0: \[5, 10\]; rank 1: \[\].*newer steps \[5, 10\] are not a save cut short"):
        agree([L([5, 10], [5, 10]), L([], [])], RUN, where)  # rank 1's node-local directory lost
    with pytest.raises(ValueError, match=r"rank 0: \[\] \(and other ranks' files of \[5\]\)"):
        agree([L([], [5]), L([], [5])], RUN, where)  # ranks on each other's nodes
    with pytest.raises(ValueError, match="step 10, were saved by a world of 1 ranks, and this world has 2"):
        agree([L([], [], 10, 1), L([], [])], RUN, where)
    with pytest.raises(ValueError, match="layout of deft_kernels before run identities"):
        agree([L([5], [5]), L([5], [5], legacy=40)], RUN, where)  # one rank sees an old step_40 folder


def test_the_layout_before_run_identities_is_not_silently_ignored(world_of_one, tmp_path):
    """A directory of checkpoints saved before run identities (directory/step_<s>/rank<r>.pt): resuming
    at 0 as if it were empty would lose them without a word."""
    model = _build()[0]
    (tmp_path / "step_00000040").mkdir()
    torch.save({"step": 40, "rank": 0, "world_size": 1, "model": model.state_dict(), "optimizer": None,
                "deft": None, "extra": None}, tmp_path / "step_00000040" / "rank0.pt")
    with pytest.raises(ValueError, match=r"step_<step>/rank<r>.pt, newest step 40\), which load_checkpoint no longer"):
        load_checkpoint(tmp_path, run_id=RUN, model=model)


WORKER_STEPS = (5, 10)


def _outcome(fn):
    """``("ok", result, warnings)`` or ``("error", type name, message)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- the test compares them
            return ("error", type(e).__name__, str(e))
    return ("ok", result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])


@gloo_rank
def _checkpoint_cases(rank, n, tmp):
    """The cases of issue 23 on 2 ranks, each in a folder of its own; what each rank saw."""
    model = nn.Linear(4, 2)
    load = lambda d, run_id=RUN: load_checkpoint(d, run_id=run_id, model=model)  # noqa: E731
    out = {}
    # Node-local directories: each rank saves into a folder of its own, and resumes from it.
    local = tmp / "local"
    for step in WORKER_STEPS:
        save_checkpoint(local / f"node{rank}", step, run_id=RUN, model=model, extra={"rank": rank, "step": step})
    out["node_local"] = _outcome(lambda: load(local / f"node{rank}"))
    # Ranks started on each other's nodes, then rank 1's directory lost: refused, nothing removed.
    out["swapped"] = _outcome(lambda: load(local / f"node{1 - rank}"))
    out["lost"] = _outcome(lambda: load(local / "node0" if rank == 0 else tmp / "empty"))
    dist.barrier()
    out["after"] = sorted(str(p.relative_to(local)) for p in local.rglob("*.pt"))
    # A shared directory; rank 1 killed while saving step 15 (its temporary file left), rank 0 done.
    shared = tmp / "shared"
    for step in WORKER_STEPS:
        save_checkpoint(shared, step, run_id=RUN, model=model, extra=("first", step))
    if rank == 0:
        save_checkpoint(shared, 15, run_id=RUN, model=model, extra=("first", 15))
    else:
        _file(shared, 15, 1, n).parent.mkdir(parents=True, exist_ok=True)
        _file(shared, 15, 1, n).with_name(".rank1.pt.tmp").write_bytes(b"half a file")
    dist.barrier()
    out["cut_short"] = _outcome(lambda: load(shared))
    dist.barrier()
    out["cut_short_left"] = _file(shared, 15, 0, n).parent.exists()
    dist.barrier()  # before a rank makes the folder anew
    save_checkpoint(shared, 15, run_id=RUN, model=model, extra=("second", 15))
    dist.barrier()
    out["saved_again"] = (complete_checkpoints(shared, RUN, n), _outcome(lambda: load(shared)))
    # Rank 1's file of the step to resume from unreadable: every rank raises (none trains on alone).
    broken = tmp / "broken" / f"node{rank}"
    for step in WORKER_STEPS:
        save_checkpoint(broken, step, run_id=RUN, model=model)
    if rank == 1:
        _file(broken, 10, 1, n).write_bytes(b"not a checkpoint")
    out["broken"] = _outcome(lambda: load(broken))
    # A world grown from 1 rank (the parent saved those, shared and node-local).
    out["grown_shared"] = _outcome(lambda: load(tmp / "grown_shared", "grown"))
    out["grown_local"] = _outcome(lambda: load(tmp / "grown_local" / f"node{rank}", "grown"))
    # For the parent to load in a world of 1 rank.
    for step in WORKER_STEPS:
        save_checkpoint(tmp / "shrunk", step, run_id="shrunk", model=model)
    return out


@pytest.mark.slow
def test_checkpoint_cases_on_two_ranks(world_of_one, tmp_path):
    model = nn.Linear(4, 2)
    for step in WORKER_STEPS:
        save_checkpoint(tmp_path / "grown_shared", step, run_id="grown", model=model)
        save_checkpoint(tmp_path / "grown_local" / "node0", step, run_id="grown", model=model)
    outcomes = run(_checkpoint_cases, 2, tmp_path, timeout=240, group_timeout=30)
    for rank, out in enumerate(outcomes):
        assert out["node_local"] == ("ok", (10, {"rank": rank, "step": 10}), []), out["node_local"]
        kind, name, message = out["swapped"]
        assert (kind, name) == ("error", "ValueError") and "rank 0: [] (and other ranks' files of [5, 10])" in message
        assert "ranks started on other nodes" in message
        kind, name, message = out["lost"]
        assert (kind, name) == ("error", "ValueError") and "rank 0: [5, 10]; rank 1: []" in message
        assert "Nothing was removed" in message
        assert out["after"] == ["node0/job1/world2/step_00000005/rank0.pt", "node0/job1/world2/step_00000010/rank0.pt",
                                "node1/job1/world2/step_00000005/rank1.pt", "node1/job1/world2/step_00000010/rank1.pt"]
        kind, result, warned = out["cut_short"]
        assert (kind, result) == ("ok", (10, ("first", 10))), out["cut_short"]
        assert len(warned) == 1 and "step 15 is incomplete (held by rank(s) [0] of 2 only" in warned[0]
        assert not out["cut_short_left"]  # rank 0's file and rank 1's temporary one removed, then the folder
        assert out["saved_again"] == ([10, 15], ("ok", (15, ("second", 15)), []))
        kind, name, message = out["broken"]
        assert (kind, name) == (("error", "RuntimeError") if rank == 0 else ("error", "UnpicklingError")), out["broken"]
        if rank == 0:
            assert "rank(s) [1] could not load their checkpoint of step 10" in message
        for case in ("grown_shared", "grown_local"):  # node-local: rank 1 holds nothing, and learns from rank 0
            kind, name, message = out[case]
            assert (kind, name) == ("error", "ValueError"), out[case]
            assert "of step 10, were saved by a world of 1 ranks, and this world has 2" in message
    with pytest.raises(ValueError, match="of step 10, were saved by a world of 2 ranks, and this world has 1"):
        load_checkpoint(tmp_path / "shrunk", run_id="shrunk", model=model)


def test_the_shared_restart_store_is_flagged_once(monkeypatch, recwarn):
    # What torchrun 2.13 puts in a worker's environment by default, and with RESTART_ENV.
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    monkeypatch.setattr(elastic, "_warned_store", False)
    with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert check_restart_store(shared) is False
    assert check_restart_store(shared) is False and not recwarn.list  # once per process
    assert check_restart_store({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is True
    assert check_restart_store({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is True
    assert check_restart_store({}) is True  # not under torchrun
    assert RESTART_ENV == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_load_checkpoint_checks_the_restart_store(world_of_one, tmp_path, monkeypatch):
    monkeypatch.setattr(elastic, "_warned_store", False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    model, opt, state = _build()
    with pytest.warns(UserWarning, match="shares one store across restarts"):
        assert load_checkpoint(tmp_path, run_id=RUN, model=model, optimizer=opt, state=state) == (0, None)


def test_rank_addresses_is_the_route_to_the_master(world_of_one, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert rank_addresses() == ["127.0.0.1"]


def test_a_killed_peer_is_named_with_its_rank():
    with pytest.raises(PeerFailure) as e:
        with naming_failures(17, ["198.18.0.1", "198.18.0.2"]):
            raise RuntimeError(RESET)
    assert (e.value.step, e.value.peer, e.value.cause) == (17, 1, "closed")
    assert "step 17" in str(e.value) and "rank 1 (198.18.0.2) closed its connection" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_timeout_says_the_peer_went_silent():
    with pytest.raises(PeerFailure) as e:
        with naming_failures(3):
            raise RuntimeError(TIMEOUT)
    assert (e.value.peer, e.value.cause) == (None, "timeout")
    assert "nothing came from a peer within the process group's timeout" in str(e.value)


def test_other_errors_pass_unchanged():
    with pytest.raises(ValueError, match="bad input"):
        with naming_failures(0):
            raise ValueError("bad input")
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with naming_failures(0):
            raise RuntimeError("shape mismatch")


def test_bad_arguments_name_the_argument(tmp_path):
    model, opt, state = _build()
    with pytest.raises(TypeError, match="directory must be a str"):
        save_checkpoint(3, 1, run_id=RUN, model=model)
    with pytest.raises(ValueError, match="step must be >= 0"):
        save_checkpoint(tmp_path, -1, run_id=RUN, model=model)
    with pytest.raises(TypeError, match="run_id must be a str"):
        save_checkpoint(tmp_path, 1, run_id=7, model=model)
    for bad in ("", "../up", ".hidden", "a/b", "x" * 129, "step_12"):
        with pytest.raises(ValueError, match="run_id must be 1-128 letters"):
            load_checkpoint(tmp_path, run_id=bad, model=model)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        save_checkpoint(tmp_path, 1, run_id=RUN, model=model, keep=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_checkpoint(tmp_path, 1, run_id=RUN, model=object())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        save_checkpoint(tmp_path, 1, run_id=RUN, model=model, optimizer=object())
    with pytest.raises(TypeError, match="state must be a DeftState"):
        load_checkpoint(tmp_path, run_id=RUN, model=model, state=object())
    with pytest.raises(TypeError, match="world_size must be an int"):
        complete_checkpoints(tmp_path, RUN, "2")
    with pytest.raises(TypeError, match="run_id must be a str"):
        complete_checkpoints(tmp_path, None, 2)
    with pytest.raises(TypeError, match="addresses must be a list of str"):
        with naming_failures(0, "198.18.0.1"):
            pass
    with pytest.raises(TypeError, match="step must be an int"):
        with naming_failures(1.5):
            pass
