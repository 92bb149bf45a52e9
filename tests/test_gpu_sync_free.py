"""The ops on CUDA values with CPU metadata never wait for the GPU, and the new CUDA kernels' own
cases (alignments, incomplete tiles, many segments) against the oracle. Skipped without a CUDA device.

Sync-freedom is checked with ``torch.cuda.set_sync_debug_mode("error")``: inside ``no_sync()`` any
call that synchronises with the device (a device-to-host copy, ``.item()``, a blocking upload,
``nonzero``, ...) raises. Results are compared with deft_kernels.reference after leaving it.
tests/test_host_metadata.py checks the same contract on the CPU (the ops layer never reads device
data).

STATUS: written on a machine without a GPU; these tests have not run yet.
"""

import contextlib

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU kernels are only tested on a GPU machine")

from deft_kernels import ops, reference  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def layout(sizes):
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    return offsets, sum(sizes)


def local_k(sizes, density):
    return torch.tensor([min(s, max(1, int(density * s))) if s else 0 for s in sizes], dtype=torch.int64)


def expected_topk(x, offsets, k, fragments=None, index_base=0):
    return reference.segmented_topk(x.cpu(), offsets, k, fragments, index_base)


SIZES = [3, 0, 70_001, 9000, 2_000_003, 17, 16_384]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fragments", [None, "listed", "empty"])
def test_segmented_topk_cpu_metadata_no_sync(seed, dtype, fragments):
    offsets, n = layout(SIZES)
    k = local_k(SIZES, 0.01)
    frag = {None: None, "listed": torch.tensor([4, 0, 2, 6]), "empty": torch.zeros(0, dtype=torch.int64)}[fragments]
    x = torch.randn(n, device=DEV).to(dtype)
    ops.segmented_topk(x, offsets, k, frag)  # warm-up: pinned staging buffers, first launches
    with no_sync():
        got = ops.segmented_topk(x, offsets, k, frag, index_base=7)
    assert got.is_cuda
    assert torch.equal(got.cpu(), expected_topk(x, offsets, k, frag, 7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_norms_cpu_offsets_no_sync(seed, dtype):
    offsets, n = layout(SIZES)
    grad, residual = torch.randn(n, device=DEV).to(dtype), torch.randn(n, device=DEV).to(dtype)
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets.to(DEV))
    ops.accumulate_norms(torch.zeros_like(grad), residual.clone(), offsets)  # warm-up
    with no_sync():
        got = ops.accumulate_norms(grad, residual, offsets)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_deft_selection_sequence_makes_one_transfer(seed):
    # The ops of one worker's DEFT selection with CPU metadata: the norms' copy to the host (what
    # the leader plans from) is the only transfer; everything after it is enqueued without waiting.
    offsets, n = layout(SIZES)
    grad, residual = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    k = local_k(SIZES, 0.01)
    frags = torch.tensor([2, 4, 6])
    for warm in (False, True):  # the first round warms up (Triton compiles sparse_pack/unpack)
        with no_sync() if warm else contextlib.nullcontext():
            norms = ops.accumulate_norms(grad, residual, offsets)
        norms_host = norms.cpu()  # the one device-to-host transfer
        assert norms_host.shape == (len(SIZES),)
        with no_sync() if warm else contextlib.nullcontext():
            idx = ops.segmented_topk(residual, offsets, k, frags)
            values = ops.sparse_pack(residual, idx, validate=False)
            ops.sparse_unpack(residual, idx, values, 0.5, validate=False)
    assert torch.all(residual[idx] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paths_take_cpu_metadata_no_sync(seed, dtype):
    from deft_kernels import triton_ops

    sizes = [3, 0, 50_000, 700]
    offsets, n = layout(sizes)
    k = local_k(sizes, 0.01)
    x = torch.randn(n, device=DEV).to(dtype)
    triton_ops.segmented_topk(x, offsets, k)  # warm-up: compiles the kernels
    triton_ops.accumulate_norms(x, x.clone(), offsets)
    residual = x.clone()
    with no_sync():
        got = triton_ops.segmented_topk(x, offsets, k, torch.tensor([2, 0]))
        norms = triton_ops.accumulate_norms(x, residual, offsets)
    assert torch.equal(got.cpu(), expected_topk(x, offsets, k, torch.tensor([2, 0])))
    assert torch.equal(residual, (x.float() * 2).to(dtype))
    torch.testing.assert_close(norms, reference.accumulate_norms(x, x.clone(), offsets.to(DEV)), rtol=1e-5, atol=1e-6)


def test_device_metadata_still_works_and_agrees(seed):
    offsets, n = layout(SIZES)
    k = local_k(SIZES, 0.001)
    x = torch.randn(n, device=DEV)
    frag = torch.tensor([6, 2])
    assert torch.equal(ops.segmented_topk(x, offsets.to(DEV), k.to(DEV), frag.to(DEV)),
                       ops.segmented_topk(x, offsets, k, frag))
    r1, r2 = x.clone(), x.clone()
    assert torch.equal(ops.accumulate_norms(x, r1, offsets.to(DEV)), ops.accumulate_norms(x, r2, offsets))
    assert torch.equal(r1, r2)


def test_metadata_on_the_wrong_device_is_rejected():
    x = torch.randn(10, device=DEV)
    with pytest.raises(ValueError, match="offsets is on meta"):
        ops.segmented_topk(x, torch.tensor([0, 10], device="meta"), torch.tensor([3]))


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' own cases (csrc/cuda/segmented_topk_kernels.cuh, accumulate_norms_kernels.cuh).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [0, 1, 3, 5])
def test_segmented_topk_every_alignment(seed, dtype, shift):
    # values starting `shift` elements past a 16-byte boundary: the vectors at the ends are read
    # element by element, the rest in 16-byte loads.
    sizes = [5, 40_000, 0, 8192, 16_390, 1]
    offsets, n = layout(sizes)
    k = local_k(sizes, 0.01)
    x = torch.randn(n + 8, device=DEV).to(dtype)[shift:shift + n]
    assert torch.equal(ops.segmented_topk(x, offsets, k).cpu(), expected_topk(x, offsets, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_segmented_topk_skewed_data_incomplete_tiles(seed, dtype, density):
    # The large values crowd into a tenth of each fragment: those tiles hold far more than their
    # share of the winners and re-read their data; the others are served from their slots.
    sizes = [1_000_000, 300_000]
    offsets, n = layout(sizes)
    scale = torch.ones(n)
    scale[:100_000] = 100.0
    scale[1_000_000:1_030_000] = 100.0
    x = (torch.randn(n) * scale).to(dtype).to(DEV)
    k = local_k(sizes, density)
    assert torch.equal(ops.segmented_topk(x, offsets, k).cpu(), expected_topk(x, offsets, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_segmented_topk_many_segments_and_heavy_ties(seed, dtype):
    sizes = torch.randint(0, 3000, (500,)).tolist() + [200_000, 0, 50_000]
    offsets, n = layout(sizes)
    x = torch.randint(-3, 4, (n,)).to(dtype).to(DEV)
    k = torch.tensor([int(torch.randint(0, s + 1, ())) for s in sizes])
    fragments = torch.randperm(len(sizes))[:300]
    assert torch.equal(ops.segmented_topk(x, offsets, k, fragments).cpu(), expected_topk(x, offsets, k, fragments))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shifts", [(0, 0), (1, 1), (0, 3)])
def test_accumulate_norms_alignments(seed, dtype, shifts):
    # Equal alignments take the 16-byte path, different ones the element-wise one.
    sizes = [3, 0, 100_000, 17, 5000, 0]
    offsets, n = layout(sizes)
    g0, r0 = shifts
    grad = torch.randn(n + 8, device=DEV).to(dtype)[g0:g0 + n]
    residual = torch.randn(n + 8, device=DEV).to(dtype)[r0:r0 + n]
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets.to(DEV))
    got = ops.accumulate_norms(grad, residual, offsets)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    exact = torch.stack([r.double().square().sum().sqrt() for r in torch.split(residual, sizes)])
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


def test_accumulate_norms_many_tiny_fragments(seed):
    sizes = torch.randint(0, 9, (3000,)).tolist()
    offsets, n = layout(sizes)
    grad, residual = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    expected_residual = residual.clone()
    expected = reference.accumulate_norms(grad, expected_residual, offsets.to(DEV))
    torch.testing.assert_close(ops.accumulate_norms(grad, residual, offsets), expected, rtol=1e-5, atol=1e-6)
