"""The ops against their plain-PyTorch oracle (deft_kernels.reference) on fresh random inputs.

Tolerances: segmented_topk indices, sparse_pack / sparse_unpack outputs and every residual are
compared exactly. Norms are compared with the oracle at rtol=1e-5, the oracle's own rounding (it
sums fp32 squares pairwise in fp32: a few ulp times log2(n)); the kernel sums in double, so it is
also held to rtol=3e-7 (about 2 ulp) against a float64 computation.
"""

import math

import pytest
import torch

from deft_kernels import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Fragment layouts (sizes), each hitting a different path of the kernels: one fragment, thousands of
# tiny ones (most fragments smaller than one radix bin table), one huge fragment that the top-k
# splits across threads, and a mixed one with empty fragments at both ends and in the middle.
LAYOUTS = {
    "one": lambda: [4099],
    "tiny": lambda: torch.randint(0, 9, (2000,)).tolist(),
    "huge": lambda: [3, 300_007, 5],
    "mixed": lambda: [0, 17, 0, 1, 2048, 0, 70_001, 3, 513, 0],
}


def offsets_for(sizes):
    return torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)


def make_values(kind, n, dtype):
    if kind == "randn":
        return torch.randn(n).to(dtype)
    if kind == "ties":  # few distinct magnitudes, both signs, a third of them zeros of either sign
        x = torch.randint(-2, 3, (n,)).to(dtype)
        return torch.where(torch.rand(n) < 0.5, x, -x)
    if kind == "zeros":  # every magnitude ties: the re-scan path of the top-k
        return torch.zeros(n, dtype=dtype)
    raise ValueError(kind)


def random_k(sizes):
    """Per fragment one of 0, 1, size, or a random value in [0, size]."""
    k = []
    for s in sizes:
        choice = int(torch.randint(0, 4, ()))
        k.append([0, min(1, s), s, int(torch.randint(0, s + 1, ()))][choice])
    return torch.tensor(k, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# segmented_topk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_segmented_topk_matches_reference(seed, dtype, layout, kind):
    sizes = LAYOUTS[layout]()
    offsets = offsets_for(sizes)
    x = make_values(kind, sum(sizes), dtype)
    k = random_k(sizes)
    got = ops.segmented_topk(x, offsets, k)
    assert got.dtype == torch.int64
    assert got.numel() == int(k.sum())
    torch.testing.assert_close(got, reference.segmented_topk(x, offsets, k), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
def test_segmented_topk_large_fragment_density(seed, dtype, density):
    # One fragment split across threads, at densities where the threshold's top-digit bin is small
    # (candidate path) and where it is a large share of the fragment.
    n = 400_000
    x = (torch.randn(n) * torch.rand(n)).to(dtype)
    offsets = torch.tensor([0, n])
    k = torch.tensor([int(density * n)])
    torch.testing.assert_close(ops.segmented_topk(x, offsets, k), reference.segmented_topk(x, offsets, k),
                               rtol=0, atol=0)


@pytest.mark.parametrize("k_rule", ["zero", "one", "full"])
def test_segmented_topk_extreme_k_everywhere(seed, k_rule):
    sizes = LAYOUTS["mixed"]()
    offsets = offsets_for(sizes)
    x = torch.randn(sum(sizes))
    size_t = torch.tensor(sizes)
    k = {"zero": torch.zeros_like(size_t), "one": size_t.clamp(max=1), "full": size_t}[k_rule]
    got = ops.segmented_topk(x, offsets, k)
    torch.testing.assert_close(got, reference.segmented_topk(x, offsets, k), rtol=0, atol=0)
    if k_rule == "full":
        assert torch.equal(got, torch.arange(x.numel()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_subset_of_fragments(seed, dtype):
    sizes = torch.randint(0, 5000, (40,)).tolist() + [300_000]
    offsets = offsets_for(sizes)
    x = torch.randn(sum(sizes)).to(dtype)
    k = random_k(sizes)
    fragments = torch.randperm(len(sizes))[:25]
    got = ops.segmented_topk(x, offsets, k, fragments)
    torch.testing.assert_close(got, reference.segmented_topk(x, offsets, k, fragments), rtol=0, atol=0)

    # The result depends only on the listed fragments: rewriting every other fragment's data
    # (even with NaN, which ranks above everything) changes nothing.
    other = torch.ones(x.numel(), dtype=torch.bool)
    for f in fragments.tolist():
        other[offsets[f]:offsets[f + 1]] = False
    y = x.clone()
    y[other] = torch.where(torch.rand(int(other.sum())) < 0.5, float("nan"), 1e4).to(dtype)
    assert torch.equal(ops.segmented_topk(y, offsets, k, fragments), got)


@pytest.mark.parametrize("kind", ["randn", "zeros"])
def test_segmented_topk_same_result_on_any_thread_count(seed, kind):
    # Large fragments are split across threads (per-thread histograms and output slices): the
    # result must not depend on how many there are.
    sizes = [300_007, 5, 280_000, 0, 9]
    offsets = offsets_for(sizes)
    x = make_values(kind, sum(sizes), torch.float32)
    k = torch.tensor([3000, 2, 140_000, 0, 9])
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(ops.segmented_topk(x, offsets, k))
    finally:
        torch.set_num_threads(threads)
    expected = reference.segmented_topk(x, offsets, k)
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_segmented_topk_empty_subset_and_no_fragments():
    x = torch.randn(10)
    empty = torch.zeros(0, dtype=torch.int64)
    assert ops.segmented_topk(x, torch.tensor([0, 10]), torch.tensor([3]), empty).numel() == 0
    assert ops.segmented_topk(torch.zeros(0), torch.tensor([0]), empty).numel() == 0


def test_segmented_topk_index_base_beyond_int32(seed):
    # Indices past 2**31 without an 8 GiB tensor: index_base is added in int64 to every position,
    # and the kernel computes positions as int64 throughout (no int32 intermediates), so a shifted
    # small vector checks the same arithmetic a huge one would use.
    base = 2**33 + 12_345
    sizes = [3, 300_007, 0, 4096, 1]
    offsets = offsets_for(sizes)
    x = torch.randn(sum(sizes))
    k = torch.tensor([2, 3000, 0, 4096, 1])
    got = ops.segmented_topk(x, offsets, k, index_base=base)
    assert int(got.min()) >= base > 2**31
    torch.testing.assert_close(got, reference.segmented_topk(x, offsets, k) + base, rtol=0, atol=0)
    torch.testing.assert_close(got, reference.segmented_topk(x, offsets, k, index_base=base), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_non_contiguous_values(seed, dtype):
    sizes = [100, 0, 3000, 77]
    offsets = offsets_for(sizes)
    x = torch.randn(2 * sum(sizes)).to(dtype)[::2]
    assert not x.is_contiguous()
    k = random_k(sizes)
    torch.testing.assert_close(ops.segmented_topk(x, offsets, k), reference.segmented_topk(x.contiguous(), offsets, k),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_nan_inf_signed_zero_policy(dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, -inf, nan, -0.0, 0.0, 3.0, -nan, inf], dtype=dtype)
    one = torch.tensor([0, 8])
    # Every NaN (either sign bit) ranks above inf; inf of either sign above any finite value.
    assert ops.segmented_topk(x, one, torch.tensor([2])).tolist() == [2, 6]
    assert ops.segmented_topk(x, one, torch.tensor([4])).tolist() == [1, 2, 6, 7]
    assert ops.segmented_topk(x, one, torch.tensor([5])).tolist() == [1, 2, 5, 6, 7]
    # -0 ties +0, and the lower index wins the tie.
    z = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype)
    assert ops.segmented_topk(z, torch.tensor([0, 4]), torch.tensor([2])).tolist() == [0, 1]
    z = torch.tensor([-0.0, 0.0], dtype=dtype)
    assert ops.segmented_topk(z, torch.tensor([0, 2]), torch.tensor([1])).tolist() == [0]
    assert torch.equal(ops.segmented_topk(x, one, torch.tensor([5])), reference.segmented_topk(x, one, torch.tensor([5])))


def test_segmented_topk_ties_go_to_lower_index(seed):
    n = 50_000
    x = torch.full((n,), 2.0)
    x[torch.randperm(n)[:100]] = -5.0
    k = torch.tensor([1000])
    got = ops.segmented_topk(x, torch.tensor([0, n]), k)
    big = torch.nonzero(x == -5.0).flatten()
    rest = torch.nonzero(x == 2.0).flatten()[:900]
    assert torch.equal(got, torch.sort(torch.cat([big, rest])).values)


# ---------------------------------------------------------------------------------------------
# accumulate_norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_accumulate_norms_matches_reference(seed, dtype, layout):
    sizes = LAYOUTS[layout]()
    offsets = offsets_for(sizes)
    n = sum(sizes)
    grad, residual = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
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
    grad = torch.randn(n, 3)[:, 1]
    assert not grad.is_contiguous()
    residual = torch.randn(n)
    residual[n - 1] = float("nan")
    residual[0] = float("inf")
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets)
    got = ops.accumulate_norms(grad, residual, offsets)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0, equal_nan=True)
    assert math.isinf(got[0]) and math.isnan(got[3]) and got[1] == 0
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# sparse_pack / sparse_unpack


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_pack_matches_reference(seed, dtype):
    values = torch.randn(200_000).to(dtype)
    indices = torch.randperm(values.numel())[:5000]
    torch.testing.assert_close(ops.sparse_pack(values, indices), reference.sparse_pack(values, indices),
                               rtol=0, atol=0)
    strided_values, strided_indices = values[::2], indices[::2] // 2
    torch.testing.assert_close(ops.sparse_pack(strided_values, strided_indices),
                               reference.sparse_pack(strided_values, strided_indices), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [0, 1, 5000, 200_000])
def test_sparse_unpack_matches_reference(seed, dtype, count):
    n = 200_000
    residual = torch.randn(n).to(dtype)
    indices = torch.randperm(n)[:count]
    values = torch.randn(2 * count).to(dtype)[::2]  # non-contiguous values
    scale = 1.0 / 3.0
    expected_residual = residual.clone()
    expected = reference.sparse_unpack(expected_residual, indices, values, scale)
    got = ops.sparse_unpack(residual, indices, values, scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)


def test_pack_unpack_conserve_the_accumulated_gradient(seed):
    # DEFT's invariant: a == new residual + what was sent, nothing lost, nothing counted twice.
    sizes = [1000, 0, 30_000, 7]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    residual = torch.randn(n)
    ops.accumulate_norms(torch.randn(n), residual, offsets)
    a = residual.clone()
    indices = ops.segmented_topk(residual, offsets, torch.tensor([10, 0, 300, 7]))
    sent = ops.sparse_unpack(residual, indices, ops.sparse_pack(residual, indices), 1.0)
    assert torch.equal(residual + sent, a)
    assert int((sent != 0).sum()) == indices.numel()


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

X = torch.randn(10)
OFF = torch.tensor([0, 4, 10])
K = torch.tensor([1, 2])
IDX = torch.tensor([1, 3])

TOPK_BAD = [
    ("values", TypeError, lambda: ops.segmented_topk(X.long(), OFF, K)),
    ("values", TypeError, lambda: ops.segmented_topk([0.0] * 10, OFF, K)),
    ("values", ValueError, lambda: ops.segmented_topk(X.view(2, 5), OFF, K)),
    ("offsets", TypeError, lambda: ops.segmented_topk(X, OFF.int(), K)),
    ("offsets", ValueError, lambda: ops.segmented_topk(X, OFF.view(1, 3), K)),
    ("offsets", ValueError, lambda: ops.segmented_topk(X, torch.zeros(0, dtype=torch.int64), K)),
    (r"offsets\[0\]", ValueError, lambda: ops.segmented_topk(X, torch.tensor([1, 4, 10]), K)),
    (r"offsets\[-1\]", ValueError, lambda: ops.segmented_topk(X, torch.tensor([0, 4, 9]), K)),
    ("non-decreasing", ValueError, lambda: ops.segmented_topk(X, torch.tensor([0, 6, 4, 10]), torch.tensor([0, 0, 0]))),
    ("offsets is on meta", ValueError, lambda: ops.segmented_topk(X, OFF.to("meta"), K)),
    ("k", TypeError, lambda: ops.segmented_topk(X, OFF, K.float())),
    ("k must have one entry per fragment", ValueError, lambda: ops.segmented_topk(X, OFF, torch.tensor([1]))),
    (r"k\[0\] = -1", ValueError, lambda: ops.segmented_topk(X, OFF, torch.tensor([-1, 2]))),
    (r"k\[1\] = 7", ValueError, lambda: ops.segmented_topk(X, OFF, torch.tensor([1, 7]))),
    ("fragments", TypeError, lambda: ops.segmented_topk(X, OFF, K, torch.tensor([0.0]))),
    ("fragments", ValueError, lambda: ops.segmented_topk(X, OFF, K, torch.tensor([0, 2]))),
    ("fragments", ValueError, lambda: ops.segmented_topk(X, OFF, K, torch.tensor([-1]))),
    ("index_base", ValueError, lambda: ops.segmented_topk(X, OFF, K, index_base=-1)),
    ("index_base", ValueError, lambda: ops.segmented_topk(X, OFF, K, index_base=1.5)),
]

NORMS_BAD = [
    ("grad", TypeError, lambda: ops.accumulate_norms(X.double(), X.double(), OFF)),
    ("grad", ValueError, lambda: ops.accumulate_norms(X.view(2, 5), X.clone(), OFF)),
    ("residual dtype", TypeError, lambda: ops.accumulate_norms(X, X.half(), OFF)),
    ("residual length", ValueError, lambda: ops.accumulate_norms(X, torch.zeros(9), OFF)),
    ("residual must be contiguous", ValueError, lambda: ops.accumulate_norms(X, torch.zeros(20)[::2], OFF)),
    ("residual is on meta", ValueError, lambda: ops.accumulate_norms(X, X.to("meta"), OFF)),
    ("offsets", TypeError, lambda: ops.accumulate_norms(X, X.clone(), OFF.float())),
    (r"offsets\[-1\]", ValueError, lambda: ops.accumulate_norms(X, X.clone(), torch.tensor([0, 4, 11]))),
    ("non-decreasing", ValueError, lambda: ops.accumulate_norms(X, X.clone(), torch.tensor([0, 5, 3, 10]))),
]

PACK_BAD = [
    ("values", TypeError, lambda: ops.sparse_pack(X.int(), IDX)),
    ("values", ValueError, lambda: ops.sparse_pack(X.view(2, 5), IDX)),
    ("indices", TypeError, lambda: ops.sparse_pack(X, IDX.int())),
    ("indices", ValueError, lambda: ops.sparse_pack(X, IDX.view(1, 2))),
    ("indices must lie", ValueError, lambda: ops.sparse_pack(X, torch.tensor([0, 10]))),
    ("indices must lie", ValueError, lambda: ops.sparse_pack(X, torch.tensor([-1]))),
    ("indices is on meta", ValueError, lambda: ops.sparse_pack(X, IDX.to("meta"))),
]

UNPACK_BAD = [
    ("residual", TypeError, lambda: ops.sparse_unpack(X.long(), IDX, X[:2].long(), 1.0)),
    ("values dtype", TypeError, lambda: ops.sparse_unpack(X.clone(), IDX, X[:2].half(), 1.0)),
    ("values length", ValueError, lambda: ops.sparse_unpack(X.clone(), IDX, X[:3], 1.0)),
    ("residual must be contiguous", ValueError, lambda: ops.sparse_unpack(torch.zeros(20)[::2], IDX, X[:2], 1.0)),
    ("indices must lie", ValueError, lambda: ops.sparse_unpack(X.clone(), torch.tensor([3, 10]), X[:2], 1.0)),
    ("indices", TypeError, lambda: ops.sparse_unpack(X.clone(), IDX.float(), X[:2], 1.0)),
    ("values is on meta", ValueError, lambda: ops.sparse_unpack(X.clone(), IDX, X[:2].to("meta"), 1.0)),
    ("scale", TypeError, lambda: ops.sparse_unpack(X.clone(), IDX, X[:2], torch.tensor(1.0))),
]


@pytest.mark.parametrize("match,exc,call", TOPK_BAD + NORMS_BAD + PACK_BAD + UNPACK_BAD,
                         ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(TOPK_BAD + NORMS_BAD + PACK_BAD + UNPACK_BAD)])
def test_bad_input_names_the_argument(match, exc, call):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_does_not_modify_residual():
    residual = X.clone()
    with pytest.raises(ValueError):
        ops.sparse_unpack(residual, torch.tensor([3, 10]), X[:2], 1.0)
    with pytest.raises(ValueError):
        ops.accumulate_norms(X, residual, torch.tensor([0, 11]))
    assert torch.equal(residual, X)


# The kernels repeat the checks memory safety needs, so a direct torch.ops call (or validate=False)
# with bad data raises instead of reading or writing out of bounds.
RAW_BAD = [
    (r"offsets\[-1\]", lambda: torch.ops.deft_kernels.segmented_topk(X, torch.tensor([0, 4, 11]), K, None, 0)),
    ("non-decreasing", lambda: ops.segmented_topk(X, torch.tensor([0, 6, 4, 10]), torch.tensor([0, 0, 0]),
                                                  validate=False)),
    (r"k\[1\] = 7", lambda: ops.segmented_topk(X, OFF, torch.tensor([1, 7]), validate=False)),
    (r"fragments\[0\] = 2", lambda: ops.segmented_topk(X, OFF, K, torch.tensor([2]), validate=False)),
    ("indices must lie", lambda: ops.sparse_pack(X, torch.tensor([10]), validate=False)),
    ("indices must lie", lambda: ops.sparse_unpack(X.clone(), torch.tensor([-1]), X[:1], 1.0, validate=False)),
    (r"offsets\[0\]", lambda: ops.accumulate_norms(X, X.clone(), torch.tensor([2, 10]), validate=False)),
]


@pytest.mark.parametrize("match,call", RAW_BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(RAW_BAD)])
def test_kernel_checks_catch_unvalidated_bad_input(match, call):
    with pytest.raises(RuntimeError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, dtype):
    sizes = [0, 100, 3, 2000]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    x = torch.randn(n).to(dtype)
    k = torch.tensor([0, 10, 3, 20])
    idx = torch.randperm(n)[:50]
    lib = torch.ops.deft_kernels
    torch.library.opcheck(lib.accumulate_norms.default, (torch.randn(n).to(dtype), x.clone(), offsets))
    torch.library.opcheck(lib.segmented_topk.default, (x, offsets, k, torch.tensor([3, 1]), 5))
    torch.library.opcheck(lib.sparse_pack.default, (x, idx))
    torch.library.opcheck(lib.sparse_unpack.default, (x.clone(), idx, torch.randn(50).to(dtype), 0.25))


def test_torch_compile_fullgraph(seed):
    sizes = [0, 1000, 3, 20_000]
    offsets = offsets_for(sizes)
    n = sum(sizes)
    k = torch.tensor([0, 10, 1, 200])

    def step(grad, residual):
        ops.accumulate_norms(grad, residual, offsets, validate=False)
        idx = ops.segmented_topk(residual, offsets, k, validate=False)
        sent = ops.sparse_unpack(residual, idx, ops.sparse_pack(residual, idx, validate=False), 0.5, validate=False)
        return idx, sent

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad, residual = torch.randn(n), torch.randn(n)
    expected_residual = residual.clone()
    expected = step(grad, expected_residual)
    got = compiled(grad, residual)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(residual, expected_residual)
