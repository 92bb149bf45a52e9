"""The Triton kernels (deft_kernels.triton_ops) against the oracle (deft_kernels.reference).

Without a GPU they run on CPU tensors in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1
before anything is imported), which costs about 0.4 ms per program instance: inputs are small, and
the top-k runs with small tiles (``block``) so that fragments span many tiles, which is where the
cross-tile logic (per-fragment histograms, tie counts carried from tile to tile, output offsets)
is exercised. With a GPU the same tests run on CUDA tensors.

Tolerances as in test_ops.py: indices, packed values, unpacked outputs and residuals exactly; norms
at rtol=1e-5 against the oracle and rtol=3e-7 against float64 (the kernel sums squares in float64).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from deft_kernels import reference  # noqa: E402
from deft_kernels import triton_ops as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

LAYOUTS = {
    "one": lambda: [1500],
    "tiny": lambda: torch.randint(0, 9, (150,)).tolist(),
    "mixed": lambda: [0, 17, 0, 1, 1100, 0, 700, 3, 513, 0],
}


def offsets_for(sizes):
    return torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(DEVICE)


def make_values(kind, n, dtype):
    if kind == "randn":
        x = torch.randn(n)
    elif kind == "ties":  # few distinct magnitudes, both signs, zeros of either sign
        x = torch.randint(-2, 3, (n,)).float()
        x = torch.where(torch.rand(n) < 0.5, x, -x)
    elif kind == "zeros":
        x = torch.zeros(n)
    else:
        raise ValueError(kind)
    return x.to(dtype).to(DEVICE)


def random_k(sizes):
    k = []
    for s in sizes:
        k.append([0, min(1, s), s, int(torch.randint(0, s + 1, ()))][int(torch.randint(0, 4, ()))])
    return torch.tensor(k, dtype=torch.int64, device=DEVICE)


def assert_topk(x, offsets, k, fragments=None, index_base=0, block=128):
    got = tk.segmented_topk(x, offsets, k, fragments, index_base=index_base, block=block)
    expected = reference.segmented_topk(x.contiguous(), offsets, k, fragments, index_base)
    assert got.dtype == torch.int64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return got


# ---------------------------------------------------------------------------------------------
# segmented_topk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_segmented_topk_matches_reference(seed, dtype, layout, kind):
    sizes = LAYOUTS[layout]()
    x = make_values(kind, sum(sizes), dtype)
    assert_topk(x, offsets_for(sizes), random_k(sizes))


@pytest.mark.parametrize("k_rule", ["zero", "one", "full"])
def test_segmented_topk_extreme_k_everywhere(seed, k_rule):
    sizes = LAYOUTS["mixed"]()
    x = make_values("randn", sum(sizes), torch.float32)
    size_t = torch.tensor(sizes, device=DEVICE)
    k = {"zero": torch.zeros_like(size_t), "one": size_t.clamp(max=1), "full": size_t}[k_rule]
    got = assert_topk(x, offsets_for(sizes), k)
    if k_rule == "full":
        assert torch.equal(got.cpu(), torch.arange(x.numel()))


@pytest.mark.parametrize("block", [16, 64, 4096])
def test_segmented_topk_independent_of_tile_size(seed, block):
    sizes = [700, 0, 5, 1100]
    x = make_values("ties", sum(sizes), torch.float32)
    assert_topk(x, offsets_for(sizes), torch.tensor([350, 0, 2, 77], device=DEVICE), block=block)


def test_segmented_topk_ties_go_to_lower_index_across_tiles(seed):
    n = 2000
    x = torch.full((n,), 2.0)
    x[torch.randperm(n)[:30]] = -5.0
    x = x.to(DEVICE)
    got = tk.segmented_topk(x, offsets_for([n]), torch.tensor([500], device=DEVICE), block=64)
    big = torch.nonzero(x == -5.0).flatten()
    rest = torch.nonzero(x == 2.0).flatten()[:470]
    assert torch.equal(got, torch.sort(torch.cat([big, rest])).values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_subset_of_fragments_reads_only_them(seed, dtype):
    sizes = torch.randint(0, 300, (12,)).tolist() + [900]
    offsets = offsets_for(sizes)
    x = make_values("randn", sum(sizes), dtype)
    k = random_k(sizes)
    fragments = torch.randperm(len(sizes))[:7].to(DEVICE)
    got = assert_topk(x, offsets, k, fragments)
    other = torch.ones(x.numel(), dtype=torch.bool, device=DEVICE)
    for f in fragments.tolist():
        other[offsets[f]:offsets[f + 1]] = False
    y = x.clone()
    y[other] = float("nan")
    assert torch.equal(tk.segmented_topk(y, offsets, k, fragments, block=128), got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_nan_inf_signed_zero_policy(dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, -inf, nan, -0.0, 0.0, 3.0, -nan, inf], dtype=dtype, device=DEVICE)
    one = offsets_for([8])

    def top(v, off, kf):
        return tk.segmented_topk(v, off, torch.tensor([kf], device=DEVICE), block=16).tolist()

    assert top(x, one, 2) == [2, 6]
    assert top(x, one, 4) == [1, 2, 6, 7]
    assert top(x, one, 5) == [1, 2, 5, 6, 7]
    z = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype, device=DEVICE)
    assert top(z, offsets_for([4]), 2) == [0, 1]
    z = torch.tensor([-0.0, 0.0], dtype=dtype, device=DEVICE)
    assert top(z, offsets_for([2]), 1) == [0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_non_contiguous_values(seed, dtype):
    sizes = [100, 0, 900, 77]
    x = make_values("randn", 2 * sum(sizes), dtype)[::2]
    assert not x.is_contiguous()
    assert_topk(x, offsets_for(sizes), random_k(sizes))


def test_segmented_topk_index_base_beyond_int32(seed):
    sizes = [3, 600, 0, 1]
    x = make_values("randn", sum(sizes), torch.float32)
    got = assert_topk(x, offsets_for(sizes), torch.tensor([2, 60, 0, 1], device=DEVICE), index_base=2**33 + 5)
    assert int(got.min()) > 2**33


def test_segmented_topk_nothing_selected():
    x = torch.randn(10, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert tk.segmented_topk(x, offsets_for([10]), torch.tensor([3], device=DEVICE), empty).numel() == 0
    assert tk.segmented_topk(x[:0], offsets_for([]), empty).numel() == 0
    assert tk.segmented_topk(x, offsets_for([4, 6]), torch.zeros(2, dtype=torch.int64, device=DEVICE)).numel() == 0


# ---------------------------------------------------------------------------------------------
# accumulate_norms


def check_norms(grad, residual, offsets):
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad.contiguous(), expected_residual, offsets)
    got = tk.accumulate_norms(grad, residual, offsets)
    assert got.dtype == torch.float32 and got.shape == (offsets.numel() - 1,)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0, equal_nan=True)
    return got, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["one", "tiny", "mixed", "spans_blocks"])
def test_accumulate_norms_matches_reference(seed, dtype, layout):
    # "spans_blocks": fragments crossing the 4096-element kernel blocks, and a block holding many.
    sizes = [5000, 3, 0, 4000, 2] + [7] * 40 if layout == "spans_blocks" else LAYOUTS[layout]()
    offsets = offsets_for(sizes)
    n = sum(sizes)
    grad, residual = make_values("randn", n, dtype), make_values("randn", n, dtype)
    got, expected = check_norms(grad, residual, offsets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    exact = torch.stack([r.double().square().sum().sqrt() for r in torch.split(residual, sizes)])
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


def test_accumulate_norms_non_contiguous_grad_and_special_values(seed):
    sizes = [5, 0, 6000, 3]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    grad = torch.randn(n, 3, device=DEVICE)[:, 1]
    assert not grad.is_contiguous()
    residual = torch.randn(n, device=DEVICE)
    residual[n - 1] = float("nan")
    residual[0] = float("inf")
    got, expected = check_norms(grad, residual, offsets)
    assert math.isinf(got[0]) and math.isnan(got[3]) and got[1] == 0
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)


def test_accumulate_norms_empty():
    assert tk.accumulate_norms(torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE),
                               offsets_for([])).numel() == 0
    got = tk.accumulate_norms(torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE), offsets_for([0, 0]))
    assert got.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# sparse_pack / sparse_unpack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [0, 1, 3000])
def test_sparse_pack_unpack_match_reference(seed, dtype, count):
    n = 5000
    values = make_values("randn", n, dtype)
    indices = torch.randperm(n)[:count].to(DEVICE)
    torch.testing.assert_close(tk.sparse_pack(values, indices), reference.sparse_pack(values, indices),
                               rtol=0, atol=0)
    strided = values[::2]
    torch.testing.assert_close(tk.sparse_pack(strided, indices // 2), reference.sparse_pack(strided, indices // 2),
                               rtol=0, atol=0)
    residual = make_values("randn", n, dtype)
    sent = make_values("randn", 2 * count, dtype)[::2]  # non-contiguous values
    expected_residual = residual.clone()
    expected = reference.sparse_unpack(expected_residual, indices, sent, 1.0 / 3.0)
    torch.testing.assert_close(tk.sparse_unpack(residual, indices, sent, 1.0 / 3.0), expected, rtol=0, atol=0)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)


def test_out_of_range_indices_are_skipped_not_accessed():
    # The registered kernels run unvalidated input (validate=False) without a synchronising check:
    # an index outside [0, n) must touch nothing.
    values = torch.arange(1.0, 9.0, device=DEVICE)
    idx = torch.tensor([2, 8, -1, 7], device=DEVICE)
    assert tk._sparse_pack(values, idx).tolist() == [3.0, 0.0, 0.0, 8.0]
    residual = values.clone()
    out = tk._sparse_unpack(residual, idx, torch.ones(4, device=DEVICE), 2.0)
    assert out.tolist() == [0, 0, 2, 0, 0, 0, 0, 2]
    assert residual.tolist() == [1, 2, 0, 4, 5, 6, 7, 0]


def test_pack_unpack_conserve_the_accumulated_gradient(seed):
    sizes = [1000, 0, 3000, 7]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    residual = torch.randn(n, device=DEVICE)
    tk.accumulate_norms(torch.randn(n, device=DEVICE), residual, offsets)
    a = residual.clone()
    indices = tk.segmented_topk(residual, offsets, torch.tensor([10, 0, 300, 7], device=DEVICE))
    sent = tk.sparse_unpack(residual, indices, tk.sparse_pack(residual, indices), 1.0)
    assert torch.equal(residual + sent, a)
    assert int((sent != 0).sum()) == indices.numel()


# ---------------------------------------------------------------------------------------------
# Arguments and registration


X = torch.randn(10, device=DEVICE)
OFF = offsets_for([4, 6])
K = torch.tensor([1, 2], device=DEVICE)

BAD = [
    ("values", TypeError, lambda: tk.segmented_topk(X.long(), OFF, K)),
    (r"k\[1\] = 7", ValueError, lambda: tk.segmented_topk(X, OFF, torch.tensor([1, 7], device=DEVICE))),
    ("fragments", ValueError, lambda: tk.segmented_topk(X, OFF, K, torch.tensor([2], device=DEVICE))),
    ("block", ValueError, lambda: tk.segmented_topk(X, OFF, K, block=100)),
    ("residual dtype", TypeError, lambda: tk.accumulate_norms(X, X.half(), OFF)),
    (r"offsets\[-1\]", ValueError, lambda: tk.accumulate_norms(X, X.clone(), offsets_for([4, 7]))),
    ("indices must lie", ValueError, lambda: tk.sparse_pack(X, torch.tensor([10], device=DEVICE))),
    ("values length", ValueError, lambda: tk.sparse_unpack(X.clone(), torch.tensor([1], device=DEVICE), X[:2], 1.0)),
]


@pytest.mark.parametrize("match,exc,call", BAD, ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(match, exc, call):
    with pytest.raises(exc, match=match):
        call()


def test_unvalidated_topk_plan_rejects_bad_offsets_and_k():
    # What a direct torch.ops call on CUDA tensors reaches: checked on the host copies.
    with pytest.raises(ValueError, match="offsets"):
        tk._segmented_topk(X, offsets_for([4, 7]), K)
    with pytest.raises(ValueError, match="k must"):
        tk._segmented_topk(X, OFF, torch.tensor([5, 0], device=DEVICE))
    with pytest.raises(ValueError, match="fragments"):
        tk._segmented_topk(X, OFF, K, torch.tensor([-1], device=DEVICE))


def test_every_op_has_a_cuda_kernel_registered():
    for name in ("accumulate_norms", "segmented_topk", "sparse_pack", "sparse_unpack"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deft_kernels::{name}", "CUDA"), name
    assert tk.register_cuda_impls() == []  # idempotent: nothing left to register
