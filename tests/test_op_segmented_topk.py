"""segmented_topk on every backend (tests/op_cases.py) against reference.segmented_topk: indices
compared exactly."""

import pytest
import torch

from deft_kernels import reference
from op_cases import (DTYPES, TOPK_LAYOUTS, BadInputs, assert_rejected, assert_unvalidated_rejected, cpu_or_none,
                      large_values, layout, make_values, offsets_for, random_k, table_ids)


def check_topk(backend, x, offsets, k, fragments=None, index_base=0, **kwargs):
    got = backend.fn.segmented_topk(x, offsets, k, fragments, index_base=index_base, **kwargs)
    assert got.device == x.device and got.dtype == torch.int64
    assert got.numel() == int(k[fragments].sum() if fragments is not None else k.sum())
    expected = reference.segmented_topk(x.cpu().contiguous(), offsets.cpu(), k.cpu(), cpu_or_none(fragments),
                                        index_base)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", TOPK_LAYOUTS)
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros"])
def test_segmented_topk_matches_reference(seed, backend, dtype, layout_name, kind):
    sizes = layout(backend, layout_name)
    x = make_values(kind, sum(sizes), dtype, backend.device)
    check_topk(backend, x, backend.offsets(sizes), random_k(sizes, backend.device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_segmented_topk_large_fragment(seed, backend, dtype, density, kind):
    # At densities where the threshold's top-digit bin is small (the candidate path) and where it is
    # a large share of the fragment (heavy ties, density 0.3 and 1.0: the re-scan path). On the CPU
    # the fragment is split across threads; on a GPU it spans many tiles of the multi-block path,
    # next to two smaller fragments.
    n = backend.pick(full=400_000, gpu=3_000_017)
    big = large_values(kind, n, dtype)
    k_big = max(1, int(density * n))
    if backend.on_gpu:
        sizes, k = [5, n, 70_000], [2, k_big, 700]
        x = torch.cat([torch.randn(5).to(dtype), big, torch.randn(70_000).to(dtype)])
    else:
        sizes, k, x = [n], [k_big], big
    check_topk(backend, x.to(backend.device), backend.offsets(sizes), backend.tensor(k))


@pytest.mark.parametrize("k_rule", ["zero", "one", "full"])
def test_segmented_topk_extreme_k_everywhere(seed, backend, k_rule):
    sizes = layout(backend, "mixed")
    x = make_values("randn", sum(sizes), torch.float32, backend.device)
    size_t = backend.tensor(sizes)
    k = {"zero": torch.zeros_like(size_t), "one": size_t.clamp(max=1), "full": size_t}[k_rule]
    got = check_topk(backend, x, backend.offsets(sizes), k)
    if k_rule == "full":
        assert torch.equal(got.cpu(), torch.arange(x.numel()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_subset_of_fragments(seed, backend, dtype):
    count, max_size, large, listed = backend.pick(full=(40, 5000, 300_000, 25), interpreted=(12, 300, 900, 7))
    sizes = torch.randint(0, max_size, (count,)).tolist() + [large]
    offsets = backend.offsets(sizes)
    x = make_values("randn", sum(sizes), dtype, backend.device)
    k = random_k(sizes, backend.device)
    fragments = torch.randperm(len(sizes))[:listed].to(backend.device)
    got = check_topk(backend, x, offsets, k, fragments)

    # The result depends only on the listed fragments: rewriting every other fragment's data
    # (even with NaN, which ranks above everything) changes nothing.
    other = torch.ones(x.numel(), dtype=torch.bool)
    for f in fragments.tolist():
        other[offsets[f]:offsets[f + 1]] = False
    y = x.clone()
    y[other.to(backend.device)] = torch.where(torch.rand(int(other.sum())) < 0.5, float("nan"), 1e4).to(dtype).to(
        backend.device)
    assert torch.equal(backend.fn.segmented_topk(y, offsets, k, fragments), got)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("kind", ["randn", "zeros"])
def test_segmented_topk_same_result_on_any_thread_count(seed, backend, kind):
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
            results.append(backend.fn.segmented_topk(x, offsets, k))
    finally:
        torch.set_num_threads(threads)
    expected = reference.segmented_topk(x, offsets, k)
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("block", [16, 64, 4096])
def test_segmented_topk_independent_of_tile_size(seed, backend, block):
    sizes = [700, 0, 5, 1100]
    x = make_values("ties", sum(sizes), torch.float32, backend.device)
    check_topk(backend, x, backend.offsets(sizes), backend.tensor([350, 0, 2, 77]), block=block)


def test_segmented_topk_empty_subset_and_no_fragments(backend):
    topk = backend.fn.segmented_topk
    empty = backend.tensor([])
    x = torch.randn(10, device=backend.device)
    assert topk(x, backend.offsets([10]), backend.tensor([3]), empty).numel() == 0
    assert topk(x[:0], backend.offsets([]), empty).numel() == 0
    assert topk(x, backend.offsets([4, 6]), backend.tensor([0, 0])).numel() == 0


def test_segmented_topk_index_base_beyond_int32(seed, backend):
    # Indices past 2**31 without an 8 GiB tensor: index_base is added in int64 to every position,
    # and the kernels compute positions as int64 throughout (no int32 intermediates), so a shifted
    # small vector checks the same arithmetic a huge one would use.
    sizes, k, base = backend.pick(full=([3, 300_007, 0, 4096, 1], [2, 3000, 0, 4096, 1], 2**33 + 12_345),
                                  interpreted=([3, 600, 0, 1], [2, 60, 0, 1], 2**33 + 5))
    offsets, k = backend.offsets(sizes), backend.tensor(k)
    x = torch.randn(sum(sizes), device=backend.device)
    got = check_topk(backend, x, offsets, k, index_base=base)
    assert int(got.min()) >= base > 2**31
    expected = reference.segmented_topk(x.cpu(), offsets.cpu(), k.cpu())
    torch.testing.assert_close(got.cpu(), expected + base, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_non_contiguous_values(seed, backend, dtype):
    sizes = backend.pick(full=[100, 0, 3000, 77], interpreted=[100, 0, 900, 77], gpu=[100, 0, 30_000, 77])
    x = make_values("randn", 2 * sum(sizes), dtype, backend.device)[::2]
    assert not x.is_contiguous()
    check_topk(backend, x, backend.offsets(sizes), random_k(sizes, backend.device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_nan_inf_signed_zero_policy(backend, dtype):
    nan, inf = float("nan"), float("inf")
    tile = backend.pick(full={}, interpreted={"block": 16})

    def top(values, k):
        v = torch.tensor(values, dtype=dtype, device=backend.device)
        return backend.fn.segmented_topk(v, backend.offsets([v.numel()]), backend.tensor([k]), **tile).tolist()

    x = [1.0, -inf, nan, -0.0, 0.0, 3.0, -nan, inf]
    # Every NaN (either sign bit) ranks above inf; inf of either sign above any finite value.
    assert top(x, 2) == [2, 6]
    assert top(x, 4) == [1, 2, 6, 7]
    assert top(x, 5) == [1, 2, 5, 6, 7]
    # -0 ties +0, and the lower index wins the tie.
    assert top([0.0, -0.0, 0.0, -0.0], 2) == [0, 1]
    assert top([-0.0, 0.0], 1) == [0]
    xt = torch.tensor(x, dtype=dtype)
    assert top(x, 5) == reference.segmented_topk(xt, offsets_for([8]), torch.tensor([5])).tolist()


def test_segmented_topk_ties_go_to_lower_index(seed, backend):
    # With the Triton tiles smaller than the input, the ties are split across tiles.
    n, n_big, k, tile = backend.pick(full=(50_000, 100, 1000, {}), interpreted=(2000, 30, 500, {"block": 64}),
                                     gpu=(500_000, 100, 10_000, {}))
    x = torch.full((n,), 2.0)
    x[torch.randperm(n)[:n_big]] = -5.0
    got = backend.fn.segmented_topk(x.to(backend.device), backend.offsets([n]), backend.tensor([k]), **tile).cpu()
    big = torch.nonzero(x == -5.0).flatten()
    rest = torch.nonzero(x == 2.0).flatten()[:k - n_big]
    assert torch.equal(got, torch.sort(torch.cat([big, rest])).values)


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

BAD = [
    ("values", TypeError, lambda f, a: f.segmented_topk(a.X.long(), a.OFF, a.K)),
    ("values", TypeError, lambda f, a: f.segmented_topk([0.0] * 10, a.OFF, a.K)),
    ("values", ValueError, lambda f, a: f.segmented_topk(a.X.view(2, 5), a.OFF, a.K)),
    ("offsets", TypeError, lambda f, a: f.segmented_topk(a.X, a.OFF.int(), a.K)),
    ("offsets", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF.view(1, 3), a.K)),
    ("offsets", ValueError, lambda f, a: f.segmented_topk(a.X, a.t([]), a.K)),
    (r"offsets\[0\]", ValueError, lambda f, a: f.segmented_topk(a.X, a.t([1, 4, 10]), a.K)),
    (r"offsets\[-1\]", ValueError, lambda f, a: f.segmented_topk(a.X, a.t([0, 4, 9]), a.K)),
    ("non-decreasing", ValueError, lambda f, a: f.segmented_topk(a.X, a.t([0, 6, 4, 10]), a.t([0, 0, 0]))),
    ("offsets is on meta", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF.to("meta"), a.K)),
    ("k", TypeError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K.float())),
    ("k must have one entry per fragment", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.t([1]))),
    (r"k\[0\] = -1", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.t([-1, 2]))),
    (r"k\[1\] = 7", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.t([1, 7]))),
    ("fragments", TypeError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, a.t([0.0], torch.float32))),
    ("fragments", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, a.t([0, 2]))),
    ("fragments", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, a.t([-1]))),
    ("index_base", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, index_base=-1)),
    ("index_base", ValueError, lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, index_base=1.5)),
]


@pytest.mark.parametrize("match,exc,call", BAD, ids=table_ids(BAD))
def test_bad_input_names_the_argument(backend, match, exc, call):
    assert_rejected(backend, exc, match, call)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_block_must_be_a_power_of_two(backend):
    a = BadInputs(backend)
    with pytest.raises(ValueError, match="block"):
        backend.fn.segmented_topk(a.X, a.OFF, a.K, block=100)


# Bad data past the ops layer's checks: (what, call, the C++ kernels' message, Triton's).
UNVALIDATED_BAD = [
    ("offsets[-1]", lambda f, a: f.segmented_topk(a.X, a.t([0, 4, 11]), a.K),
     r"offsets\[-1\]", "offsets must start at 0 and end at the vector length"),
    ("non-decreasing", lambda f, a: f.segmented_topk(a.X, a.t([0, 6, 4, 10]), a.t([0, 0, 0])),
     "non-decreasing", "non-decreasing"),
    ("k too large", lambda f, a: f.segmented_topk(a.X, a.OFF, a.t([1, 7])),
     r"k\[1\] = 7", "k must"),
    ("k above the first fragment", lambda f, a: f.segmented_topk(a.X, a.OFF, a.t([5, 0])),
     r"k\[0\] = 5", "k must"),
    ("fragment id too large", lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, a.t([2])),
     r"fragments\[0\] = 2", "fragments"),
    ("fragment id negative", lambda f, a: f.segmented_topk(a.X, a.OFF, a.K, a.t([-1])),
     r"fragments\[0\] = -1", "fragments"),
]


@pytest.mark.parametrize("what,call,cpp_match,triton_match", UNVALIDATED_BAD, ids=table_ids(UNVALIDATED_BAD))
def test_unvalidated_bad_input_raises(backend, what, call, cpp_match, triton_match):
    # On "cuda": the CUDA op raises a Python error naming the argument and never crashes the process
    # (the first GPU run found a SIGSEGV while the message was formatted).
    assert_unvalidated_rejected(backend, call, cpp_match, triton_match)


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, backend, dtype):
    sizes = [0, 100, 3, 2000]
    x = torch.randn(sum(sizes)).to(dtype).to(backend.device)
    k = backend.tensor([0, 10, 3, 20])
    torch.library.opcheck(torch.ops.deft_kernels.segmented_topk.default,
                          (x, backend.offsets(sizes), k, backend.tensor([3, 1]), 5))
