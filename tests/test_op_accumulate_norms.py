"""accumulate_norms on every backend (tests/op_cases.py) against reference.accumulate_norms: the
updated residual exactly, norms at rtol=1e-5 against the oracle and 3e-7 against float64."""

import math

import pytest
import torch

from deft_kernels import reference
from op_cases import (DTYPES, NORMS_LAYOUTS, BadInputs, assert_rejected, assert_rejected_leaves_residual,
                      layout, make_values, table_ids)


def check_norms(backend, grad, residual, offsets):
    """Runs the op; checks dtype, shape and the updated residual (exactly, NaN included) against
    the oracle. Returns (norms, the oracle's norms)."""
    expected_residual = residual.cpu().clone()
    expected = reference.accumulate_norms(grad.cpu().contiguous(), expected_residual, offsets.cpu())
    got = backend.fn.accumulate_norms(grad, residual, offsets)
    assert got.device == residual.device
    assert got.dtype == torch.float32 and got.shape == (offsets.numel() - 1,)
    torch.testing.assert_close(residual.cpu(), expected_residual, rtol=0, atol=0, equal_nan=True)
    return got.cpu(), expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", NORMS_LAYOUTS)
def test_accumulate_norms_matches_reference(seed, backend, dtype, layout_name):
    sizes = layout(backend, layout_name)
    n = sum(sizes)
    grad, residual = make_values("randn", n, dtype, backend.device), make_values("randn", n, dtype, backend.device)
    got, expected = check_norms(backend, grad, residual, backend.offsets(sizes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    exact = torch.stack([r.double().square().sum().sqrt() for r in torch.split(residual.cpu(), sizes)])
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


def test_accumulate_norms_non_contiguous_grad_and_special_values(seed, backend):
    sizes = backend.pick(full=[5, 0, 40_000, 3], interpreted=[5, 0, 6000, 3])
    n = sum(sizes)
    grad = torch.randn(n, 3, device=backend.device)[:, 1]
    assert not grad.is_contiguous()
    residual = torch.randn(n, device=backend.device)
    residual[n - 1] = float("nan")
    residual[0] = float("inf")
    got, expected = check_norms(backend, grad, residual, backend.offsets(sizes))
    assert math.isinf(got[0]) and math.isnan(got[3]) and got[1] == 0
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)


def test_accumulate_norms_empty(backend):
    empty = torch.zeros(0, device=backend.device)
    assert backend.fn.accumulate_norms(empty, empty.clone(), backend.offsets([])).numel() == 0
    got = backend.fn.accumulate_norms(empty, empty.clone(), backend.offsets([0, 0]))
    assert got.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

BAD = [
    ("grad", TypeError, lambda f, a: f.accumulate_norms(a.X.double(), a.X.double(), a.OFF)),
    ("grad", ValueError, lambda f, a: f.accumulate_norms(a.X.view(2, 5), a.X.clone(), a.OFF)),
    ("residual dtype", TypeError, lambda f, a: f.accumulate_norms(a.X, a.X.half(), a.OFF)),
    ("residual length", ValueError, lambda f, a: f.accumulate_norms(a.X, a.X.new_zeros(9), a.OFF)),
    ("residual must be contiguous", ValueError, lambda f, a: f.accumulate_norms(a.X, a.X.new_zeros(20)[::2], a.OFF)),
    ("residual is on meta", ValueError, lambda f, a: f.accumulate_norms(a.X, a.X.to("meta"), a.OFF)),
    ("offsets", TypeError, lambda f, a: f.accumulate_norms(a.X, a.X.clone(), a.OFF.float())),
    (r"offsets\[-1\]", ValueError, lambda f, a: f.accumulate_norms(a.X, a.X.clone(), a.t([0, 4, 11]))),
    ("non-decreasing", ValueError, lambda f, a: f.accumulate_norms(a.X, a.X.clone(), a.t([0, 5, 3, 10]))),
]


@pytest.mark.parametrize("match,exc,call", BAD, ids=table_ids(BAD))
def test_bad_input_names_the_argument(backend, match, exc, call):
    assert_rejected(backend, exc, match, call)


def test_bad_input_does_not_modify_residual(backend):
    assert_rejected_leaves_residual(backend, lambda f, a, residual: f.accumulate_norms(a.X, residual, a.t([0, 11])))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_kernel_checks_catch_unvalidated_bad_input(backend):
    # The C++ kernel repeats the checks memory safety needs, so validate=False (or a direct torch.ops
    # call) with bad offsets raises instead of reading out of bounds. (The Triton kernel clamps the
    # fragment ids it derives from the offsets instead.)
    a = BadInputs(backend)
    with pytest.raises(RuntimeError, match=r"offsets\[0\]"):
        backend.unvalidated.accumulate_norms(a.X, a.X.clone(), a.t([2, 10]))


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, backend, dtype):
    sizes = [0, 100, 3, 2000]
    n = sum(sizes)
    grad, residual = (torch.randn(n).to(dtype).to(backend.device) for _ in range(2))
    torch.library.opcheck(torch.ops.deft_kernels.accumulate_norms.default, (grad, residual, backend.offsets(sizes)))
