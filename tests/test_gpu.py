"""The ops on CUDA tensors through torch.ops.deft_kernels (the CUDA extension's top-k when it was
built with CUDA, the Triton kernels otherwise) and through the Triton top-k directly, against the
oracle: the cases of test_ops.py, plus fragments large enough for the multi-block paths of the
CUDA top-k (candidate buffer and heavy-tie re-scan). Skipped without a CUDA device.

STATUS: written on a machine without a GPU; these tests have not been run yet.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU kernels are only tested on a GPU machine")

from deft_kernels import ops, reference  # noqa: E402
from test_ops import LAYOUTS, make_values, random_k  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def offsets_for(sizes):
    return torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(DEV)


def topk_via_op(x, offsets, k, fragments=None, index_base=0):
    return ops.segmented_topk(x, offsets, k, fragments, index_base=index_base)


def topk_via_triton(x, offsets, k, fragments=None, index_base=0):
    from deft_kernels import triton_ops

    return triton_ops.segmented_topk(x, offsets, k, fragments, index_base=index_base)


TOPK = {"op": topk_via_op, "triton": topk_via_triton}


def check_topk(path, x, offsets, k, fragments=None, index_base=0):
    got = TOPK[path](x, offsets, k, fragments, index_base)
    assert got.is_cuda and got.dtype == torch.int64
    expected = reference.segmented_topk(x.cpu().contiguous(), offsets.cpu(), k.cpu(),
                                        None if fragments is None else fragments.cpu(), index_base)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    return got


def test_which_kernels_serve_cuda():
    from deft_kernels import triton_ops

    for name in ("accumulate_norms", "segmented_topk", "sparse_pack", "sparse_unpack"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deft_kernels::{name}", "CUDA"), name
    print("Triton serves:", triton_ops.REGISTERED, "(the rest: the CUDA extension)")


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_segmented_topk_matches_reference(seed, path, dtype, layout, kind):
    sizes = LAYOUTS[layout]()
    x = make_values(kind, sum(sizes), dtype).to(DEV)
    check_topk(path, x, offsets_for(sizes), random_k(sizes).to(DEV))


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_segmented_topk_large_fragment(seed, path, dtype, density, kind):
    # Millions of elements: many tiles per fragment; "ties" and density 0.3 / 1.0 overflow the
    # candidate buffer of the CUDA kernel (re-scan path).
    n = 3_000_017
    x = (torch.randn(n) * torch.rand(n)).to(dtype) if kind == "randn" else make_values("ties", n, dtype)
    sizes = [5, n, 70_000]
    k = torch.tensor([2, max(1, int(density * n)), 700])
    check_topk(path, torch.cat([torch.randn(5).to(dtype), x, torch.randn(70_000).to(dtype)]).to(DEV),
               offsets_for(sizes), k.to(DEV))


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("k_rule", ["zero", "one", "full"])
def test_segmented_topk_extreme_k_everywhere(seed, path, k_rule):
    sizes = LAYOUTS["mixed"]()
    x = torch.randn(sum(sizes), device=DEV)
    size_t = torch.tensor(sizes, device=DEV)
    k = {"zero": torch.zeros_like(size_t), "one": size_t.clamp(max=1), "full": size_t}[k_rule]
    got = check_topk(path, x, offsets_for(sizes), k)
    if k_rule == "full":
        assert torch.equal(got.cpu(), torch.arange(x.numel()))


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_subset_of_fragments(seed, path, dtype):
    sizes = torch.randint(0, 5000, (40,)).tolist() + [300_000]
    offsets = offsets_for(sizes)
    x = torch.randn(sum(sizes)).to(dtype).to(DEV)
    k = random_k(sizes).to(DEV)
    fragments = torch.randperm(len(sizes))[:25].to(DEV)
    got = check_topk(path, x, offsets, k, fragments)
    other = torch.ones(x.numel(), dtype=torch.bool, device=DEV)
    for f in fragments.tolist():
        other[offsets[f]:offsets[f + 1]] = False
    y = x.clone()
    y[other] = float("nan")
    assert torch.equal(TOPK[path](y, offsets, k, fragments), got)


@pytest.mark.parametrize("path", list(TOPK))
def test_segmented_topk_empty_subset_and_no_fragments(path):
    empty = torch.zeros(0, dtype=torch.int64, device=DEV)
    assert TOPK[path](torch.randn(10, device=DEV), offsets_for([10]), torch.tensor([3], device=DEV), empty).numel() == 0
    assert TOPK[path](torch.zeros(0, device=DEV), offsets_for([]), empty).numel() == 0


@pytest.mark.parametrize("path", list(TOPK))
def test_segmented_topk_index_base_beyond_int32(seed, path):
    sizes = [3, 300_007, 0, 4096, 1]
    x = torch.randn(sum(sizes), device=DEV)
    got = check_topk(path, x, offsets_for(sizes), torch.tensor([2, 3000, 0, 4096, 1], device=DEV),
                     index_base=2**33 + 12_345)
    assert int(got.min()) > 2**31


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_non_contiguous_values(seed, path, dtype):
    sizes = [100, 0, 30_000, 77]
    x = torch.randn(2 * sum(sizes)).to(dtype).to(DEV)[::2]
    check_topk(path, x, offsets_for(sizes), random_k(sizes).to(DEV))


@pytest.mark.parametrize("path", list(TOPK))
@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_nan_inf_signed_zero_policy(path, dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, -inf, nan, -0.0, 0.0, 3.0, -nan, inf], dtype=dtype, device=DEV)
    one = offsets_for([8])

    def top(v, off, kf):
        return TOPK[path](v, off, torch.tensor([kf], device=DEV)).tolist()

    assert top(x, one, 2) == [2, 6]
    assert top(x, one, 4) == [1, 2, 6, 7]
    assert top(x, one, 5) == [1, 2, 5, 6, 7]
    assert top(torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype, device=DEV), offsets_for([4]), 2) == [0, 1]
    assert top(torch.tensor([-0.0, 0.0], dtype=dtype, device=DEV), offsets_for([2]), 1) == [0]


@pytest.mark.parametrize("path", list(TOPK))
def test_segmented_topk_ties_go_to_lower_index(seed, path):
    n = 500_000
    x = torch.full((n,), 2.0)
    x[torch.randperm(n)[:100]] = -5.0
    got = TOPK[path](x.to(DEV), offsets_for([n]), torch.tensor([10_000], device=DEV)).cpu()
    big = torch.nonzero(x == -5.0).flatten()
    rest = torch.nonzero(x == 2.0).flatten()[:9900]
    assert torch.equal(got, torch.sort(torch.cat([big, rest])).values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accumulate_norms_matches_reference(seed, dtype, layout):
    sizes = LAYOUTS[layout]()
    offsets = offsets_for(sizes)
    n = sum(sizes)
    grad, residual = torch.randn(n).to(dtype).to(DEV), torch.randn(n).to(dtype).to(DEV)
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets)
    got = ops.accumulate_norms(grad, residual, offsets)
    assert got.dtype == torch.float32 and got.shape == (len(sizes),)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    exact = torch.stack([r.double().square().sum().sqrt() for r in torch.split(residual, sizes)])
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


def test_accumulate_norms_non_contiguous_grad_and_special_values(seed):
    sizes = [5, 0, 40_000, 3]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    grad = torch.randn(n, 3, device=DEV)[:, 1]
    residual = torch.randn(n, device=DEV)
    residual[n - 1] = float("nan")
    residual[0] = float("inf")
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets)
    got = ops.accumulate_norms(grad, residual, offsets)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0, equal_nan=True)
    assert math.isinf(got[0]) and math.isnan(got[3]) and got[1] == 0
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [0, 1, 5000, 200_000])
def test_sparse_pack_unpack_match_reference(seed, dtype, count):
    n = 200_000
    values = torch.randn(n).to(dtype).to(DEV)
    indices = torch.randperm(n)[:count].to(DEV)
    torch.testing.assert_close(ops.sparse_pack(values, indices), reference.sparse_pack(values, indices), rtol=0, atol=0)
    residual = torch.randn(n).to(dtype).to(DEV)
    sent = torch.randn(2 * count).to(dtype).to(DEV)[::2]
    expected_residual = residual.clone()
    expected = reference.sparse_unpack(expected_residual, indices, sent, 1.0 / 3.0)
    torch.testing.assert_close(ops.sparse_unpack(residual, indices, sent, 1.0 / 3.0), expected, rtol=0, atol=0)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)


def test_pack_unpack_conserve_the_accumulated_gradient(seed):
    sizes = [1000, 0, 300_000, 7]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    residual = torch.randn(n, device=DEV)
    ops.accumulate_norms(torch.randn(n, device=DEV), residual, offsets)
    a = residual.clone()
    indices = ops.segmented_topk(residual, offsets, torch.tensor([10, 0, 3000, 7], device=DEV))
    sent = ops.sparse_unpack(residual, indices, ops.sparse_pack(residual, indices), 1.0)
    assert torch.equal(residual + sent, a)
    assert int((sent != 0).sum()) == indices.numel()


def test_unvalidated_bad_offsets_and_k_raise():
    x = torch.randn(10, device=DEV)
    lib = torch.ops.deft_kernels
    with pytest.raises((RuntimeError, ValueError), match="offsets"):
        lib.segmented_topk(x, offsets_for([4, 7]), torch.tensor([1, 2], device=DEV), None, 0)
    with pytest.raises((RuntimeError, ValueError), match="k"):
        lib.segmented_topk(x, offsets_for([4, 6]), torch.tensor([1, 7], device=DEV), None, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, dtype):
    sizes = [0, 100, 3, 2000]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    x = torch.randn(n).to(dtype).to(DEV)
    k = torch.tensor([0, 10, 3, 20], device=DEV)
    idx = torch.randperm(n)[:50].to(DEV)
    lib = torch.ops.deft_kernels
    torch.library.opcheck(lib.accumulate_norms.default, (torch.randn(n).to(dtype).to(DEV), x.clone(), offsets))
    torch.library.opcheck(lib.segmented_topk.default, (x, offsets, k, torch.tensor([3, 1], device=DEV), 5))
    torch.library.opcheck(lib.sparse_pack.default, (x, idx))
    torch.library.opcheck(lib.sparse_unpack.default, (x.clone(), idx, torch.randn(50).to(dtype).to(DEV), 0.25))


def test_torch_compile_fullgraph(seed):
    sizes = [0, 1000, 3, 20_000]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    k = torch.tensor([0, 10, 1, 200], device=DEV)

    def step(grad, residual):
        ops.accumulate_norms(grad, residual, offsets, validate=False)
        idx = ops.segmented_topk(residual, offsets, k, validate=False)
        sent = ops.sparse_unpack(residual, idx, ops.sparse_pack(residual, idx, validate=False), 0.5, validate=False)
        return idx, sent

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad, residual = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    expected_residual = residual.clone()
    expected = step(grad, expected_residual)
    got = compiled(grad, residual)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(residual, expected_residual)
