"""threshold_select on every backend (tests/op_cases.py) against reference.threshold_select: indices
compared exactly. Also: the sparsifiers' indices_at_least, which now calls the op, selects what
its elementwise expression selected before."""

import math

import pytest
import torch

from deft_kernels import reference
from deft_kernels.sparsifiers.base import indices_at_least
from op_cases import (DTYPES, TOPK_LAYOUTS, BadInputs, assert_rejected, assert_unvalidated_rejected, cpu_or_none,
                      large_values, layout, make_values, offsets_for, table_ids)

INF, NAN = float("inf"), float("nan")


def check_select(backend, x, offsets, thresholds, segments=None, index_base=0, **kwargs):
    got = backend.fn.threshold_select(x, offsets, thresholds, segments, index_base=index_base, **kwargs)
    assert got.device == x.device and got.dtype == torch.int64
    expected = reference.threshold_select(x.cpu().contiguous(), offsets.cpu(), thresholds.cpu(),
                                          cpu_or_none(segments), index_base)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    return got


def smallest_subnormal(dtype) -> float:
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    return float(torch.ones(1, dtype=bits).view(dtype))


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a twentieth of its elements replaced by NaN (either sign), +-inf, +-0 and the
    dtype's smallest subnormals."""
    sub = smallest_subnormal(x.dtype)
    specials = torch.tensor([NAN, -NAN, INF, -INF, 0.0, -0.0, sub, -sub], dtype=x.dtype)
    pos = torch.randperm(x.numel())[: x.numel() // 20]
    y = x.clone()
    y[pos] = specials[torch.randint(0, specials.numel(), (pos.numel(),))]
    return y


def random_thresholds(x: torch.Tensor, sizes) -> torch.Tensor:
    """Per segment one of 0, +inf, a negative value, the smallest fp32 subnormal, a random value in
    (0, 3), or (twice as likely) a non-NaN magnitude present in the segment, so that elements tie
    with it."""
    out, start = [], 0
    for size in sizes:
        mag = x[start:start + size].float().abs()
        mag = mag[~torch.isnan(mag)]
        start += size
        choices = [0.0, INF, -1.5, math.ldexp(1.0, -149), 3 * float(torch.rand(()))]
        if mag.numel():
            choices += [float(mag[torch.randint(0, mag.numel(), ())])] * 2
        out.append(choices[int(torch.randint(0, len(choices), ()))])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_name", TOPK_LAYOUTS)
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "specials"])
def test_threshold_select_matches_reference(seed, backend, dtype, layout_name, kind):
    sizes = layout(backend, layout_name)
    x = make_values("randn" if kind == "specials" else kind, sum(sizes), dtype)
    if kind == "specials":
        x = with_specials(x)
    thresholds = random_thresholds(x, sizes).to(backend.device)
    check_select(backend, x.to(backend.device), backend.offsets(sizes), thresholds)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_select_special_values(backend, dtype):
    def select(values, t):
        v = torch.tensor(values, dtype=dtype, device=backend.device)
        return backend.fn.threshold_select(v, backend.offsets([v.numel()]),
                                           backend.tensor([t], torch.float32)).tolist()

    x = [1.0, -INF, NAN, -0.0, 0.0, 3.0, -NAN, INF, 0.5, -1.0]
    # NaN of either sign is always selected, zero of either sign never; inf of either sign reaches
    # every threshold up to +inf.
    assert select(x, 1.0) == [0, 1, 2, 5, 6, 7, 9]
    assert select(x, 0.0) == [0, 1, 2, 5, 6, 7, 8, 9]
    assert select(x, -INF) == [0, 1, 2, 5, 6, 7, 8, 9]
    assert select(x, 3.5) == [1, 2, 6, 7]
    assert select(x, INF) == [1, 2, 6, 7]
    # Compared in fp32: the float32 just above 1 rounds to 1 in bf16 and fp16, yet 1 stays below it.
    above_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
    assert select([1.0, -1.0, 1.0078125], above_one) == [2]
    # Subnormals compare by value, not flushed to zero.
    sub = smallest_subnormal(dtype)
    assert select([sub, -sub, 0.0, 2 * sub], sub) == [0, 1, 3]
    assert select([sub, -sub, 0.0, 2 * sub], float(torch.nextafter(torch.tensor(sub), torch.tensor(1.0)))) == [3]


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_select_non_contiguous_values(seed, backend, dtype):
    sizes = backend.pick(full=[100, 0, 3000, 77], interpreted=[100, 0, 900, 77], gpu=[100, 0, 30_000, 77])
    x = make_values("randn", 2 * sum(sizes), dtype, backend.device)[::2]
    assert not x.is_contiguous()
    check_select(backend, x, backend.offsets(sizes), random_thresholds(x.cpu(), sizes).to(backend.device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_select_subset_of_segments(seed, backend, dtype):
    count, max_size, large, listed = backend.pick(full=(40, 5000, 300_000, 25), interpreted=(12, 300, 900, 7))
    sizes = torch.randint(0, max_size, (count,)).tolist() + [large]
    offsets = backend.offsets(sizes)
    x = with_specials(make_values("randn", sum(sizes), dtype))
    thresholds = random_thresholds(x, sizes).to(backend.device)
    x = x.to(backend.device)
    segments = torch.randperm(len(sizes))[:listed].to(backend.device)  # listed in any order
    got = check_select(backend, x, offsets, thresholds, segments)

    # Only the listed segments' data is read: NaN (always selected) everywhere else changes nothing.
    other = torch.ones(x.numel(), dtype=torch.bool)
    for s in segments.tolist():
        other[offsets[s]:offsets[s + 1]] = False
    y = x.clone()
    y[other.to(backend.device)] = NAN
    assert torch.equal(backend.fn.threshold_select(y, offsets, thresholds, segments), got)


def test_threshold_select_empty_inputs(backend):
    select = backend.fn.threshold_select
    x = torch.randn(10, device=backend.device)
    empty = backend.tensor([])
    no_thresholds = backend.tensor([], torch.float32)
    zero = backend.tensor([0.0, 0.0], torch.float32)
    assert select(x, backend.offsets([4, 6]), zero, empty).numel() == 0  # no segment listed
    assert select(x[:0], backend.offsets([]), no_thresholds).numel() == 0  # no segments at all
    assert select(x[:0], backend.offsets([0, 0]), zero).numel() == 0  # empty segments only
    assert select(x, backend.offsets([0, 10, 0]), backend.tensor([0.0, 0.0, 0.0], torch.float32),
                  backend.tensor([2, 0])).numel() == 0  # only empty ones listed
    assert select(x, backend.offsets([4, 6]), backend.tensor([INF, INF], torch.float32)).numel() == 0  # none reach
    assert torch.equal(select(x, backend.offsets([4, 6]), zero).cpu(), torch.arange(10))  # all reach


def test_threshold_select_index_base_beyond_int32(seed, backend):
    # Indices past 2**31 without an 8 GiB tensor: every position is int64 in the kernels, and
    # index_base is added to it in int64.
    sizes = backend.pick(full=[3, 300_007, 0, 4096, 1], interpreted=[3, 600, 0, 1])
    base = 2**33 + 12_345
    x = torch.randn(sum(sizes))
    offsets, thresholds = backend.offsets(sizes), backend.tensor([0.5] * len(sizes), torch.float32)
    got = check_select(backend, x.to(backend.device), offsets, thresholds, index_base=base)
    assert got.numel() > 0 and int(got.min()) >= base > 2**31
    expected = reference.threshold_select(x, offsets.cpu(), thresholds.cpu())
    torch.testing.assert_close(got.cpu(), expected + base, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_threshold_select_large_segment(seed, backend, dtype, density, kind):
    # A segment split across threads (CPU) or spanning many blocks (GPU), next to two small ones;
    # the threshold is the magnitude quantile that keeps about `density` of it (ties: exactly at
    # one of few magnitudes), 0 at density 1.
    n = backend.pick(full=1_000_003, gpu=3_000_017)
    big = large_values(kind, n, dtype)
    t = 0.0 if density == 1.0 else float(torch.quantile(big[:100_000].float().abs(), 1 - density))
    x = torch.cat([torch.randn(5).to(dtype), big, torch.randn(70_000).to(dtype)])
    check_select(backend, x.to(backend.device), backend.offsets([5, n, 70_000]),
                 backend.tensor([0.5, t, 2.0], torch.float32))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_threshold_select_same_result_on_any_thread_count(seed, backend):
    # Each thread compacts a contiguous share of the listed segments into its own buffer: the
    # result must not depend on how many there are, nor on where the shares' borders fall.
    sizes = [300_007, 5, 280_000, 0, 9, 150_001]
    x = with_specials(torch.randn(sum(sizes)))
    offsets, thresholds = offsets_for(sizes), torch.tensor([1.5, 0.0, 0.3, 1.0, INF, 2.5])
    segments = torch.tensor([5, 2, 0, 3, 1, 4])
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3, 7):
            torch.set_num_threads(t)
            results.append(backend.fn.threshold_select(x, offsets, thresholds, segments))
    finally:
        torch.set_num_threads(threads)
    expected = reference.threshold_select(x, offsets, thresholds, segments)
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("block", [16, 64, 4096])
def test_threshold_select_independent_of_tile_size(seed, backend, block):
    sizes = [700, 0, 5, 1100]
    x = with_specials(make_values("ties", sum(sizes), torch.float32))
    thresholds = torch.tensor([1.0, 0.0, 0.0, 2.0], device=backend.device)
    check_select(backend, x.to(backend.device), backend.offsets(sizes), thresholds, block=block)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
def test_threshold_select_metadata_on_the_cpu(seed, backend):
    # The sync-free way on a GPU: offsets, thresholds and segments stay on the host.
    if not backend.on_gpu:
        pytest.skip("the values are on the CPU: there is no other device for the metadata")
    sizes = [1000, 0, 300_000, 7]
    x = with_specials(torch.randn(sum(sizes)))
    thresholds = random_thresholds(x, sizes)
    got = check_select(backend, x.to(backend.device), offsets_for(sizes), thresholds, torch.tensor([2, 0, 3]))
    assert got.is_cuda


def test_threshold_select_nan_threshold_unvalidated_selects_only_nans(backend):
    # validate=False skips the NaN check: no magnitude reaches NaN, so only the NaNs are selected.
    x = torch.tensor([1.0, NAN, 0.0, INF, -NAN], device=backend.device)
    got = backend.unvalidated.threshold_select(x, backend.offsets([5]), backend.tensor([NAN], torch.float32))
    assert got.tolist() == [1, 4]


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

def _thr(a, values):
    return a.t(values, torch.float32)


BAD = [
    ("values", TypeError, lambda f, a: f.threshold_select(a.X.long(), a.OFF, _thr(a, [1, 1]))),
    ("values", TypeError, lambda f, a: f.threshold_select([0.0] * 10, a.OFF, _thr(a, [1, 1]))),
    ("values", ValueError, lambda f, a: f.threshold_select(a.X.view(2, 5), a.OFF, _thr(a, [1, 1]))),
    ("offsets", TypeError, lambda f, a: f.threshold_select(a.X, a.OFF.int(), _thr(a, [1, 1]))),
    ("offsets", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF.view(1, 3), _thr(a, [1, 1]))),
    ("offsets", ValueError, lambda f, a: f.threshold_select(a.X, a.t([]), _thr(a, [1, 1]))),
    (r"offsets\[0\]", ValueError, lambda f, a: f.threshold_select(a.X, a.t([1, 4, 10]), _thr(a, [1, 1]))),
    (r"offsets\[-1\]", ValueError, lambda f, a: f.threshold_select(a.X, a.t([0, 4, 9]), _thr(a, [1, 1]))),
    ("non-decreasing", ValueError, lambda f, a: f.threshold_select(a.X, a.t([0, 6, 4, 10]), _thr(a, [1, 1, 1]))),
    ("offsets is on meta", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF.to("meta"), _thr(a, [1, 1]))),
    ("thresholds", TypeError, lambda f, a: f.threshold_select(a.X, a.OFF, [1.0, 1.0])),
    ("thresholds", TypeError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]).double())),
    ("thresholds", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]).view(1, 2))),
    ("thresholds must have one entry per segment", ValueError,
     lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1]))),
    (r"thresholds\[1\] is NaN", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, NAN]))),
    ("thresholds is on meta", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]).to("meta"))),
    ("segments", TypeError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), a.t([0.0], torch.float32))),
    ("segments", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), a.t([0, 2]))),
    ("segments", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), a.t([-1]))),
    ("segments is on meta", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]),
                                                                       a.t([0]).to("meta"))),
    ("index_base", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), index_base=-1)),
    ("index_base", ValueError, lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), index_base=1.5)),
]


@pytest.mark.parametrize("match,exc,call", BAD, ids=table_ids(BAD))
def test_bad_input_names_the_argument(backend, match, exc, call):
    assert_rejected(backend, exc, match, call)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_block_must_be_a_power_of_two(backend):
    a = BadInputs(backend)
    with pytest.raises(ValueError, match="block"):
        backend.fn.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), block=100)


# Bad data past the ops layer's checks: (what, call, the C++ kernels' message, Triton's).
UNVALIDATED_BAD = [
    ("offsets[-1]", lambda f, a: f.threshold_select(a.X, a.t([0, 4, 11]), _thr(a, [1, 1])),
     r"offsets\[-1\]", "offsets must start at 0 and end at the vector length"),
    ("non-decreasing", lambda f, a: f.threshold_select(a.X, a.t([0, 6, 4, 10]), _thr(a, [1, 1, 1])),
     "non-decreasing", "non-decreasing"),
    ("segment id too large", lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), a.t([1, 2])),
     r"segments\[1\] = 2", "segments must hold ids"),
    ("segment id negative", lambda f, a: f.threshold_select(a.X, a.OFF, _thr(a, [1, 1]), a.t([-1])),
     r"segments\[0\] = -1", "segments must hold ids"),
]


@pytest.mark.parametrize("what,call,cpp_match,triton_match", UNVALIDATED_BAD, ids=table_ids(UNVALIDATED_BAD))
def test_unvalidated_bad_input_raises(backend, what, call, cpp_match, triton_match):
    assert_unvalidated_rejected(backend, call, cpp_match, triton_match)


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
def test_direct_op_call_checks_the_thresholds(backend):
    a = BadInputs(backend)
    with pytest.raises(RuntimeError, match="thresholds must have one entry per segment"):
        torch.ops.deft_kernels.threshold_select(a.X, a.OFF, _thr(a, [1]))
    with pytest.raises(RuntimeError, match="thresholds must be float32"):
        torch.ops.deft_kernels.threshold_select(a.X, a.OFF, _thr(a, [1, 1]).double())


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, backend, dtype):
    sizes = [0, 100, 3, 2000]
    x = with_specials(torch.randn(sum(sizes)).to(dtype)).to(backend.device)
    thresholds = torch.tensor([0.0, 1.0, INF, 0.5])
    lib = torch.ops.deft_kernels
    for meta_device in {torch.device("cpu"), backend.device}:  # metadata on the host, or next to the values
        offsets = offsets_for(sizes).to(meta_device)
        torch.library.opcheck(lib.threshold_select.default, (x, offsets, thresholds.to(meta_device)))
        torch.library.opcheck(lib.threshold_select.default,
                              (x, offsets, thresholds.to(meta_device), torch.tensor([3, 1]).to(meta_device), 5))


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
def test_torch_compile_fullgraph(seed, backend):
    sizes = [0, 1000, 3, 20_000]
    offsets = offsets_for(sizes)
    thresholds = torch.tensor([0.0, 1.0, 0.0, 2.5])

    def select(x):
        return backend.fn.threshold_select(x, offsets, thresholds, index_base=7, validate=False)

    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    x = with_specials(torch.randn(sum(sizes))).to(backend.device)
    assert torch.equal(compiled(x), select(x))


# ---------------------------------------------------------------------------------------------
# The sparsifiers' selection (HardThreshold, SIDCo, MiCRO)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0, 2.5, 1e39, INF, -1.0, NAN])
def test_indices_at_least_selects_what_the_elementwise_rule_did(seed, threshold):
    # indices_at_least used to be five elementwise passes and a nonzero; on fp32 data the op gives
    # the same indices, the Python-float threshold rounded to fp32 either way (0.1 is not an fp32
    # number; 1e39 rounds to inf; a NaN threshold selects only the NaNs).
    acc = with_specials(torch.randn(100_003))
    for lo, hi in [(0, None), (0, acc.numel()), (17, 50_000), (50_000, 50_000), (99_000, 100_003)]:
        part = acc[lo:hi]
        mag = part.abs()
        before = torch.nonzero(((mag >= threshold) & (mag > 0)) | torch.isnan(part)).flatten() + lo
        assert torch.equal(indices_at_least(acc, threshold, lo, hi), before)
