"""deft_kernels.elastic without a cluster: checkpoints per rank (atomic files, completeness, keep,
the DeftState restored so that training continues exactly, loaded with weights_only=True, agreed on
the group's device), the errors naming a lost peer (from the messages gloo gave on the emulated
cluster), and bad arguments. tests/test_cluster_faults.py runs the
whole recipe with real faults."""


import pickle

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

# What gloo raised on the emulated cluster (2 nodes, timeout 5 s): a peer's process SIGKILLed, its link down.
RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [198.18.0.2]:59031: "
         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
TIMEOUT = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"

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
            save_checkpoint(ckpt, step + 1, model=ddp, optimizer=opt, state=state, extra={"step": step + 1})


def test_resume_from_checkpoint_equals_not_stopping(world_of_one, tmp_path):
    model, opt, state = _build()
    _train(model, opt, state, range(10), ckpt=tmp_path)
    straight = [p.detach().clone() for p in model.parameters()]
    assert complete_checkpoints(tmp_path, 1) == [6, 9]  # keep=2: step 3 removed
    assert not list(tmp_path.glob("**/*.tmp"))

    model, opt, state = _build()
    step, extra = load_checkpoint(tmp_path, model=model, optimizer=opt, state=state)
    assert (step, extra) == (9, {"step": 9}) and state.iter == 9 and state.sparsifiers
    _train(model, opt, state, range(9, 10))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight))


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_files_load_with_weights_only(world_of_one, tmp_path, name):
    """Every sparsifier's state, past the warm-up, with an optimizer holding momentum: nothing in the
    file needs more than torch.load(weights_only=True)."""
    model, opt, state = _build(name)
    _train(model, opt, state, range(4))
    path = save_checkpoint(tmp_path, 4, model=model, optimizer=opt, state=state,
                           extra={"step": 4, "losses": [0.5, 0.25], "seed": torch.tensor([7])})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    saved = torch.load(path, weights_only=True)
    assert saved["deft"]["buckets"] and saved["extra"]["losses"] == [0.5, 0.25]
    model, opt, state = _build(name)
    assert load_checkpoint(tmp_path, model=model, optimizer=opt, state=state)[0] == 4 and state.iter == 4


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
    save_checkpoint(tmp_path, 3, model=model)
    path = tmp_path / "step_00000003" / "rank0.pt"
    saved = torch.load(path, weights_only=True)
    torch.save(dict(saved, extra=_Payload()), path)  # rewritten behind save_checkpoint's back
    _RAN.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(tmp_path, model=_build()[0])
    assert not _RAN


class _Note:
    def __init__(self, text):
        self.text = text


def test_save_refuses_what_weights_only_cannot_load(world_of_one, tmp_path):
    model = _build()[0]
    with pytest.raises(TypeError, match=r"_Note.*torch.load\(weights_only=True\) refuses"):
        save_checkpoint(tmp_path, 3, model=model, extra=_Note("hi"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # neither the file nor its temporary
    with pytest.raises(AttributeError, match="pickle"):  # what pickle cannot write at all
        save_checkpoint(tmp_path, 3, model=model, extra=lambda: None)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with torch.serialization.safe_globals([_Note]):  # allowed where the loader allows it too
        save_checkpoint(tmp_path, 3, model=model, extra=_Note("hi"))
        assert load_checkpoint(tmp_path, model=model)[1].text == "hi"


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
        load_checkpoint(tmp_path, model=_build()[0])
    assert devices and set(devices) == {"meta"}


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
        assert load_checkpoint(tmp_path, model=model, optimizer=opt, state=state) == (0, None)


def test_incomplete_checkpoints_are_ignored(world_of_one, tmp_path):
    model, opt, state = _build()
    assert load_checkpoint(tmp_path, model=model, optimizer=opt, state=state) == (0, None)
    (tmp_path / "step_00000012").mkdir()
    (tmp_path / "step_00000012" / "rank1.pt").write_bytes(b"")  # another rank's file alone
    assert complete_checkpoints(tmp_path, 1) == [] and complete_checkpoints(tmp_path, 2) == []
    assert load_checkpoint(tmp_path, model=model, state=state) == (0, None)


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
        save_checkpoint(3, 1, model=model)
    with pytest.raises(ValueError, match="step must be >= 0"):
        save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        save_checkpoint(tmp_path, 1, model=model, keep=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_checkpoint(tmp_path, 1, model=object())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=object())
    with pytest.raises(TypeError, match="state must be a DeftState"):
        load_checkpoint(tmp_path, model=model, state=object())
    with pytest.raises(TypeError, match="world_size must be an int"):
        complete_checkpoints(tmp_path, "2")
    with pytest.raises(TypeError, match="addresses must be a list of str"):
        with naming_failures(0, "198.18.0.1"):
            pass
    with pytest.raises(TypeError, match="step must be an int"):
        with naming_failures(1.5):
            pass
