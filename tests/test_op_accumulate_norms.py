"""accumulate_norms on every backend (tests/op_cases.py) against reference.accumulate_norms, for
every (grad, residual) dtype pair it takes: the updated residual exactly, norms at rtol=1e-5 against
the oracle and 3e-7 against float64."""

import math

import pytest
import torch

from deft_kernels import reference
from op_cases import (DTYPES, NORMS_LAYOUTS, BadInputs, assert_rejected, assert_rejected_leaves_residual,
                      layout, make_values, table_ids)

# (grad, residual): one dtype, or a 16-bit gradient accumulating into its fp32 residual in place.
PAIRS = [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
MIXED = PAIRS[len(DTYPES):]


def pair_id(pair) -> str:
    g, r = (str(d).removeprefix("torch.") for d in pair)
    return g if g == r else f"{g}-into-{r}"


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


def check_against_float64(got, residual, sizes):
    exact = torch.stack([r.double().square().sum().sqrt() for r in torch.split(residual.cpu(), sizes)])
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("layout_name", NORMS_LAYOUTS)
def test_accumulate_norms_matches_reference(seed, backend, pair, layout_name):
    sizes = layout(backend, layout_name)
    n = sum(sizes)
    grad = make_values("randn", n, pair[0], backend.device)
    residual = make_values("randn", n, pair[1], backend.device)
    got, expected = check_norms(backend, grad, residual, backend.offsets(sizes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    check_against_float64(got, residual, sizes)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("kind", ["ties", "zeros"])
def test_accumulate_norms_ties_and_zeros(seed, backend, pair, kind):
    # few distinct magnitudes (or only zeros of either sign) in both inputs: sums that cancel exactly
    sizes = layout(backend, "mixed")
    n = sum(sizes)
    grad, residual = make_values(kind, n, pair[0], backend.device), make_values("ties", n, pair[1], backend.device)
    got, expected = check_norms(backend, grad, residual, backend.offsets(sizes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    check_against_float64(got, residual, sizes)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_accumulate_norms_non_contiguous_grad_and_special_values(seed, backend, pair):
    sizes = backend.pick(full=[5, 0, 40_000, 3], interpreted=[5, 0, 6000, 3])
    n = sum(sizes)
    grad = torch.randn(n, 3).to(pair[0]).to(backend.device)[:, 1]
    assert not grad.is_contiguous()
    residual = torch.randn(n).to(pair[1]).to(backend.device)
    residual[n - 1] = float("nan")
    residual[0] = float("inf")
    grad[1] = float("-inf")
    got, expected = check_norms(backend, grad, residual, backend.offsets(sizes))
    assert math.isinf(got[0]) and math.isnan(got[3]) and got[1] == 0
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the Triton interpreter's
@pytest.mark.parametrize("residual_dtype", [torch.float16, torch.float32])
def test_accumulate_norms_sum_overflows_only_a_16_bit_residual(backend, residual_dtype):
    # fp16's largest value twice: inf in an fp16 residual, 131008 in an fp32 one (the fp32 add is
    # not rounded to the gradient's dtype)
    grad = torch.full((6,), 65504.0, dtype=torch.float16, device=backend.device)
    residual = torch.full((6,), 65504.0, dtype=residual_dtype, device=backend.device)
    got, expected = check_norms(backend, grad, residual, backend.offsets([2, 4]))
    if residual_dtype == torch.float16:
        assert torch.isinf(residual).all() and torch.isinf(got).all()
    else:
        assert (residual == 131008.0).all()
        torch.testing.assert_close(got, torch.tensor([131008.0 * 2**0.5, 131008.0 * 2]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_accumulate_norms_fp32_residual_keeps_small_gradients(backend, grad_dtype):
    # 0.25 added to 1024 is exact in fp32; a 16-bit residual would round it away (bf16's spacing at
    # 1024 is 8, fp16's is 1)
    grad = torch.full((300,), 0.25, dtype=grad_dtype, device=backend.device)
    for residual_dtype, want in ((torch.float32, 1024.25), (grad_dtype, 1024.0)):
        residual = torch.full((300,), 1024.0, dtype=residual_dtype, device=backend.device)
        check_norms(backend, grad, residual, backend.offsets([300]))
        assert (residual.float() == want).all()


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_accumulate_norms_empty(backend, pair):
    grad, residual = (torch.zeros(0, dtype=d, device=backend.device) for d in pair)
    assert backend.fn.accumulate_norms(grad, residual, backend.offsets([])).numel() == 0
    got = backend.fn.accumulate_norms(grad, residual, backend.offsets([0, 0]))
    assert got.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

BAD = [
    ("grad", TypeError, lambda f, a: f.accumulate_norms(a.X.double(), a.X.double(), a.OFF)),
    ("grad", ValueError, lambda f, a: f.accumulate_norms(a.X.view(2, 5), a.X.clone(), a.OFF)),
    ("residual dtype float16 does not go with grad dtype float32", TypeError,
     lambda f, a: f.accumulate_norms(a.X, a.X.half(), a.OFF)),
    ("residual dtype bfloat16 does not go with grad dtype float32", TypeError,
     lambda f, a: f.accumulate_norms(a.X, a.X.bfloat16(), a.OFF)),
    ("residual dtype float16 does not go with grad dtype bfloat16", TypeError,
     lambda f, a: f.accumulate_norms(a.X.bfloat16(), a.X.half(), a.OFF)),
    ("residual dtype bfloat16 does not go with grad dtype float16", TypeError,
     lambda f, a: f.accumulate_norms(a.X.half(), a.X.bfloat16(), a.OFF)),
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
    # a dtype pair the kernel does not take, past the ops layer (its check is there, always on)
    for grad, residual in ((a.X, a.X.bfloat16()), (a.X.half(), a.X.bfloat16())):
        with pytest.raises(TypeError, match="residual dtype .* does not go with grad dtype"):
            torch.ops.deft_kernels.accumulate_norms(grad, residual, a.OFF)


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("pair", [(torch.float32,) * 2, (torch.bfloat16,) * 2, MIXED[0]], ids=pair_id)
def test_opcheck(seed, backend, pair):
    sizes = [0, 100, 3, 2000]
    n = sum(sizes)
    grad, residual = (torch.randn(n).to(dtype).to(backend.device) for dtype in pair)
    torch.library.opcheck(torch.ops.deft_kernels.accumulate_norms.default, (grad, residual, backend.offsets(sizes)))
