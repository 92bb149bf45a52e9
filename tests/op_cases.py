"""Case tables and helpers shared by the per-op test modules (``tests/test_op_<op>.py``).

Every op test runs on each backend that implements the op, through the ``backend`` fixture
(conftest.py), against the plain-PyTorch oracle (``deft_kernels.reference``):

- ``"cpu"``: the C++/OpenMP kernels through :mod:`deft_kernels.ops`, on CPU tensors;
- ``"triton"``: the functions of :mod:`deft_kernels.triton_ops` called directly; on CUDA tensors
  when there is a GPU, otherwise on CPU tensors in the Triton interpreter (conftest.py sets
  ``TRITON_INTERPRET=1``), which costs about 0.4 ms per program instance. Interpreted cases use
  small inputs (:meth:`Backend.pick`) and small top-k tiles, so that fragments still span many tiles
  and the cross-tile logic (per-fragment histograms, tie counts carried between tiles, output
  offsets) runs. Skipped without triton;
- ``"cuda"``: :mod:`deft_kernels.ops` on CUDA tensors (the CUDA extension's kernels where it was
  built with CUDA, the Triton kernels registered for CUDA otherwise). Skipped without a GPU.

A test that concerns one backend only (thread-count determinism of the C++ kernels, Triton tile
sizes) stays in its op's module and pins the fixture, e.g.
``@pytest.mark.parametrize("backend", ["cpu"], indirect=True)``.

Tolerances: indices, packed values, unpacked outputs and residuals are compared exactly. Norms are
compared with the oracle at rtol=1e-5, the oracle's own rounding (it sums fp32 squares pairwise in
fp32: a few ulp times log2(n)); the kernels sum in double, so they are also held to rtol=3e-7
(about 2 ulp) against a float64 computation.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["cpu", "triton", "cuda"]

# The Triton tile under the interpreter: small inputs still span many tiles.
INTERPRETED_BLOCK = 128


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu", "triton" or "cuda"
    device: torch.device
    interpreted: bool  # Triton on CPU tensors: slow, small inputs only
    fn: Any  # the ops, with deft_kernels.ops' signatures (less `validate`)
    unvalidated: Any  # the same ops past the data checks of the ops layer (what torch.ops calls reach)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, full, interpreted=None, gpu=None):
        """A case's size for this backend: ``interpreted`` under the Triton interpreter (``None``:
        too slow there, the test is skipped), ``gpu`` on CUDA tensors (default: ``full``), ``full``
        on the C++ CPU kernels."""
        if self.interpreted:
            if interpreted is None:
                pytest.skip("too large for the Triton interpreter")
            return interpreted
        return gpu if self.on_gpu and gpu is not None else full

    def tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def offsets(self, sizes) -> torch.Tensor:
        return offsets_for(sizes).to(self.device)


def make_backend(name: str) -> Backend:
    from deft_kernels import ops

    if name == "cpu":
        return Backend("cpu", torch.device("cpu"), False, ops, _unvalidated_ops())
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the CUDA kernels are only tested on a GPU machine")
        return Backend("cuda", torch.device("cuda"), False, ops, _unvalidated_ops())
    if name == "triton":
        pytest.importorskip("triton")
        from deft_kernels import triton_ops as tk

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        interpreted = device.type == "cpu"
        tiled = {"block": INTERPRETED_BLOCK} if interpreted else {}
        fn = types.SimpleNamespace(accumulate_norms=tk.accumulate_norms,
                                   segmented_topk=functools.partial(tk.segmented_topk, **tiled),
                                   threshold_select=functools.partial(tk.threshold_select, **tiled),
                                   sparse_pack=tk.sparse_pack, sparse_unpack=tk.sparse_unpack)
        # the op implementations as the dispatcher reaches them from ops.*(validate=False): pack and
        # unpack take the schema's validate, which the ops layer passes as False
        raw = types.SimpleNamespace(accumulate_norms=tk._accumulate_norms, segmented_topk=tk._segmented_topk,
                                    threshold_select=tk._threshold_select,
                                    sparse_pack=functools.partial(tk._sparse_pack, validate=False),
                                    sparse_unpack=functools.partial(tk._sparse_unpack, validate=False))
        return Backend("triton", device, interpreted, fn, raw)
    raise ValueError(f"unknown backend {name!r}")


def _unvalidated_ops():
    from deft_kernels import ops

    names = ("accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack")
    return types.SimpleNamespace(**{n: functools.partial(getattr(ops, n), validate=False) for n in names})


# Fragment layouts (sizes), each hitting a different path of the kernels: one fragment, thousands of
# tiny ones (most fragments smaller than one radix bin table), one huge fragment that the C++ top-k
# splits across threads, a mixed one with empty fragments at both ends and in the middle, and
# fragments crossing the Triton norms' 4096-element blocks next to a block holding many.
# Each entry: (full size, interpreted size).
_LAYOUTS = {
    "one": (lambda: [4099], lambda: [1500]),
    "tiny": (lambda: torch.randint(0, 9, (2000,)).tolist(), lambda: torch.randint(0, 9, (150,)).tolist()),
    "huge": (lambda: [3, 300_007, 5], lambda: [3, 5000, 5]),
    "mixed": (lambda: [0, 17, 0, 1, 2048, 0, 70_001, 3, 513, 0], lambda: [0, 17, 0, 1, 1100, 0, 700, 3, 513, 0]),
    "spans_blocks": (lambda: [5000, 3, 0, 4000, 2] + [7] * 40, lambda: [5000, 3, 0, 4000, 2] + [7] * 40),
}
TOPK_LAYOUTS = ["one", "tiny", "huge", "mixed"]
NORMS_LAYOUTS = list(_LAYOUTS)


def layout(backend: Backend, name: str) -> list[int]:
    full, interpreted = _LAYOUTS[name]
    return backend.pick(full, interpreted)()


def offsets_for(sizes) -> torch.Tensor:
    return torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0)


def make_values(kind: str, n: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    if kind == "randn":
        x = torch.randn(n)
    elif kind == "ties":  # few distinct magnitudes, both signs, a fifth of them zeros of either sign
        x = torch.randint(-2, 3, (n,)).float()
        x = torch.where(torch.rand(n) < 0.5, x, -x)
    elif kind == "zeros":  # every magnitude ties: the re-scan path of the top-k
        x = torch.zeros(n)
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


def large_values(kind: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A large fragment's values: magnitudes spread over decades ("randn") or few distinct ones ("ties")."""
    return (torch.randn(n) * torch.rand(n)).to(dtype) if kind == "randn" else make_values("ties", n, dtype)


def random_k(sizes, device="cpu") -> torch.Tensor:
    """Per fragment one of 0, 1, size, or a random value in [0, size]."""
    k = []
    for s in sizes:
        choice = int(torch.randint(0, 4, ()))
        k.append([0, min(1, s), s, int(torch.randint(0, s + 1, ()))][choice])
    return torch.tensor(k, dtype=torch.int64, device=device)


def cpu_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


class BadInputs:
    """Small valid arguments on the backend's device, from which the bad-input tables derive one bad
    argument each: ``X`` (10 values), ``OFF`` (two fragments, 4 and 6), ``K``, ``IDX``."""

    def __init__(self, backend: Backend):
        self.device = backend.device
        self.X = torch.randn(10, generator=torch.Generator().manual_seed(0)).to(self.device)
        self.OFF = self.t([0, 4, 10])
        self.K = self.t([1, 2])
        self.IDX = self.t([1, 3])

    def t(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


def table_ids(table) -> list[str]:
    return [f"{i}-{case[0]}" for i, case in enumerate(table)]


def assert_rejected(backend: Backend, exc, match: str, call) -> None:
    """``call(ops, BadInputs)`` raises ``exc`` with a message matching ``match``."""
    with pytest.raises(exc, match=match):
        call(backend.fn, BadInputs(backend))


def assert_rejected_leaves_residual(backend: Backend, call) -> None:
    """``call(ops, BadInputs, residual)`` raises ValueError and leaves ``residual`` untouched."""
    a = BadInputs(backend)
    residual = a.X.clone()
    with pytest.raises(ValueError):
        call(backend.fn, a, residual)
    assert torch.equal(residual, a.X)


def assert_unvalidated_rejected(backend: Backend, call, cpp_match: str, triton_match: str) -> None:
    """Past the ops layer's data checks (``validate=False``, a direct torch.ops call, the Triton
    launcher) ``call(ops, BadInputs)`` still raises: a RuntimeError from the C++ kernels' checks
    (CPU, CUDA; the CUDA op may also check in Python, a ValueError) matching ``cpp_match``, a
    ValueError from the Triton launcher's matching ``triton_match``."""
    if backend.name == "triton":
        exc, match = ValueError, triton_match
    else:
        exc, match = (RuntimeError if backend.name == "cpu" else (RuntimeError, ValueError)), cpp_match
    with pytest.raises(exc, match=match):
        call(backend.unvalidated, BadInputs(backend))
