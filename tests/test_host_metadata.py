"""The host-metadata contract of deft_kernels.ops (issue 9): offsets, k and fragments may be CPU
tensors next to device values, and the ops layer never reads device data on the host.

Without a GPU the device values live on the meta device, which has shapes and dtypes but no data.
A TorchFunctionMode records every call that would bring device data to the host (``.item()``,
``.cpu()``, ``.tolist()``, ``bool()``, ``int()``, data-dependent shapes such as ``nonzero``, ...) and
answers the ``torch.ops.deft_kernels`` ops itself, recording where their arguments are: the ops layer
must hand the kernels CPU metadata as it got it (the CUDA glue uploads it once, non-blocking). The
same calls run on a GPU under ``torch.cuda.set_sync_debug_mode("error")`` in
tests/test_gpu_sync_free.py.
"""

import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from deft_kernels import ops

# Calls that copy a tensor's data to the host, or whose output shape depends on it (the GPU must
# finish before the host knows it).
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "masked_select", "unique", "repeat_interleave", "argwhere"}


class HostReads(TorchFunctionMode):
    """Records host reads of non-CPU tensors and the devices of the deft_kernels ops' arguments."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.op_calls: list[tuple[str, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        off_cpu = [t for t in tensors if t.device.type != "cpu"]
        if str(func).startswith("deft_kernels."):
            devices = {i: a.device.type for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
            self.op_calls.append((str(func), devices))
            return torch.empty(0, dtype=torch.int64, device=args[0].device)
        targets = (*args[1:], kwargs.get("device"))
        to_host = name in ("to", "copy_") and any(
            isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu" for a in targets)
        if off_cpu and (name in HOST_READS or to_host):
            self.reads.append(name)
        return func(*args, **kwargs)


def meta(x):
    return x.to("meta")


OFFSETS = torch.tensor([0, 5, 5, 705, 708])
K = torch.tensor([2, 0, 70, 3])


def calls():
    x = meta(torch.randn(708))
    return {
        "accumulate_norms": lambda: ops.accumulate_norms(meta(torch.randn(708)), x.clone(), OFFSETS),
        "segmented_topk": lambda: ops.segmented_topk(x, OFFSETS, K),
        "segmented_topk listed": lambda: ops.segmented_topk(x, OFFSETS, K, torch.tensor([2, 0])),
        "segmented_topk none listed": lambda: ops.segmented_topk(x, OFFSETS, K, torch.zeros(0, dtype=torch.int64)),
        "segmented_topk bf16 index_base": lambda: ops.segmented_topk(x.bfloat16(), OFFSETS, K, index_base=2**33),
        "threshold_select": lambda: ops.threshold_select(x, OFFSETS, torch.ones(4), torch.tensor([3, 0])),
    }


@pytest.mark.parametrize("name", list(calls()))
def test_ops_take_cpu_metadata_and_never_read_device_data(name):
    with HostReads() as mode:
        calls()[name]()
    assert mode.reads == [], f"{name} read device data on the host: {mode.reads}"
    assert len(mode.op_calls) == 1
    op, devices = mode.op_calls[0]
    # values (and residual) stay on the device; the metadata reaches the kernel still on the CPU.
    assert devices[0] == "meta"
    assert [d for i, d in devices.items() if i > (1 if "accumulate" in op else 0)] == \
        ["cpu"] * (len(devices) - (2 if "accumulate" in op else 1))


@pytest.mark.parametrize("match,call", [
    (r"k\[2\] = 701", lambda x: ops.segmented_topk(x, OFFSETS, torch.tensor([2, 0, 701, 3]))),
    (r"offsets\[-1\]", lambda x: ops.segmented_topk(x, torch.tensor([0, 5, 5, 705, 709]), K)),
    (r"offsets must be non-decreasing", lambda x: ops.segmented_topk(x, torch.tensor([0, 5, 4, 705, 708]), K)),
    ("fragments", lambda x: ops.segmented_topk(x, OFFSETS, K, torch.tensor([4]))),
    (r"offsets\[0\]", lambda x: ops.accumulate_norms(x, x.clone(), torch.tensor([1, 5, 5, 705, 708]))),
])
def test_bad_cpu_metadata_is_rejected_on_the_host(match, call):
    x = meta(torch.randn(708))
    with HostReads() as mode, pytest.raises(ValueError, match=match):
        call(x)
    assert mode.reads == [] and mode.op_calls == []


def test_metadata_on_another_device_is_rejected():
    x = torch.randn(708)
    with pytest.raises(ValueError, match="offsets is on meta but must be on the CPU"):
        ops.segmented_topk(x, meta(OFFSETS), K)
    with pytest.raises(ValueError, match="k is on meta"):
        ops.segmented_topk(x, OFFSETS, meta(K))
    with pytest.raises(ValueError, match="offsets is on meta"):
        ops.accumulate_norms(x, x.clone(), meta(OFFSETS))


def test_sparse_ops_read_their_indices_only_when_validating():
    # indices are data on the values' device (the top-k's output), not metadata: validating them
    # reads them, so hot loops pass validate=False.
    x, idx = meta(torch.randn(708)), meta(torch.tensor([3, 9, 700]))
    with HostReads() as mode:
        ops.sparse_pack(x, idx, validate=False)
        ops.sparse_unpack(x.clone(), idx, meta(torch.randn(3)), 0.5, validate=False)
    assert mode.reads == [] and len(mode.op_calls) == 2
    with HostReads() as mode, pytest.raises(Exception):
        ops.sparse_pack(x, idx)
    assert "item" in mode.reads


def test_cpu_metadata_gives_the_same_result_as_before(seed):
    # On the CPU build everything is on the CPU: the contract changes nothing there.
    from deft_kernels import reference

    x = torch.randn(708)
    assert torch.equal(ops.segmented_topk(x, OFFSETS, K, torch.tensor([2, 0])),
                       reference.segmented_topk(x, OFFSETS, K, torch.tensor([2, 0])))


def test_import_does_not_import_triton():
    code = ("import sys, torch, deft_kernels\n"
            "from deft_kernels import ops\n"
            "x = torch.randn(100)\n"
            "ops.segmented_topk(x, torch.tensor([0, 100]), torch.tensor([5]))\n"
            "print('triton' in sys.modules, sorted(ops.TRITON_FALLBACK))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False", "import deft_kernels (and a CPU op call) imported triton"


def test_every_op_has_a_cuda_implementation_without_importing_triton():
    # Every op, whichever serves it on CUDA: the extension's kernel or the (lazy) Triton fallback.
    code = ("import sys, torch, deft_kernels\n"
            "names = deft_kernels.ops._TRITON_FALLBACK_OPS\n"
            "print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f'deft_kernels::{n}', 'CUDA') for n in names),"
            " 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
    assert ops._register_triton_fallbacks() == []  # idempotent
