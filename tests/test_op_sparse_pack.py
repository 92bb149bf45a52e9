"""sparse_pack and sparse_unpack on every backend (tests/op_cases.py) against the oracle
(reference.sparse_pack / sparse_unpack), compared exactly; with them the tests of the ops working
together (conservation of the accumulated gradient, one compiled step)."""

import types

import pytest
import torch

from deft_kernels import reference
from op_cases import DTYPES, BadInputs, assert_rejected, assert_rejected_leaves_residual, make_values, table_ids


def random_indices(backend, count: str) -> tuple[int, torch.Tensor]:
    """The vector length and ``count`` ("none", "one", "some" or "all") distinct indices into it."""
    n = backend.pick(full=200_000, interpreted=5000)
    m = {"none": 0, "one": 1, "some": backend.pick(full=5000, interpreted=3000), "all": n}[count]
    return n, torch.randperm(n)[:m].to(backend.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ["none", "one", "some", "all"])
def test_sparse_pack_matches_reference(seed, backend, dtype, count):
    n, indices = random_indices(backend, count)
    values = make_values("randn", n, dtype, backend.device)
    got = backend.fn.sparse_pack(values, indices)
    assert got.device == values.device
    torch.testing.assert_close(got.cpu(), reference.sparse_pack(values.cpu(), indices.cpu()), rtol=0, atol=0)
    strided_values, strided_indices = values[::2], indices // 2  # strided values, repeated indices
    torch.testing.assert_close(backend.fn.sparse_pack(strided_values, strided_indices).cpu(),
                               reference.sparse_pack(strided_values.cpu(), strided_indices.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ["none", "one", "some", "all"])
def test_sparse_unpack_matches_reference(seed, backend, dtype, count):
    n, indices = random_indices(backend, count)
    residual = make_values("randn", n, dtype, backend.device)
    values = make_values("randn", 2 * indices.numel(), dtype, backend.device)[::2]  # non-contiguous values
    scale = 1.0 / 3.0
    expected_residual = residual.cpu().clone()
    expected = reference.sparse_unpack(expected_residual, indices.cpu(), values.cpu(), scale)
    got = backend.fn.sparse_unpack(residual, indices, values, scale)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(residual.cpu(), expected_residual, rtol=0, atol=0)


def test_out_of_range_indices_are_skipped_not_accessed(backend):
    # validate=False: the caller vouched for the indices and no layer scans them (the ops layer
    # passes validate=False to the op, so the C++ binding does not scan either); an index outside
    # [0, n) must still touch nothing, in every kernel. (Before the checks were one layer, the CPU
    # binding scanned the indices whatever validate said and raised here.)
    values = torch.arange(1.0, 9.0, device=backend.device)
    idx = backend.tensor([2, 8, -1, 7])
    assert backend.unvalidated.sparse_pack(values, idx).tolist() == [3.0, 0.0, 0.0, 8.0]
    residual = values.clone()
    out = backend.unvalidated.sparse_unpack(residual, idx, torch.ones(4, device=backend.device), 2.0)
    assert out.tolist() == [0, 0, 2, 0, 0, 0, 0, 2]
    assert residual.tolist() == [1, 2, 0, 4, 5, 6, 7, 0]


def test_pack_unpack_conserve_the_accumulated_gradient(seed, backend):
    # DEFT's invariant: a == new residual + what was sent, nothing lost, nothing counted twice.
    sizes, k = backend.pick(full=([1000, 0, 30_000, 7], [10, 0, 300, 7]),
                            interpreted=([1000, 0, 3000, 7], [10, 0, 300, 7]),
                            gpu=([1000, 0, 300_000, 7], [10, 0, 3000, 7]))
    offsets = backend.offsets(sizes)
    n = sum(sizes)
    f = backend.fn
    residual = torch.randn(n, device=backend.device)
    f.accumulate_norms(torch.randn(n, device=backend.device), residual, offsets)
    a = residual.clone()
    indices = f.segmented_topk(residual, offsets, backend.tensor(k))
    sent = f.sparse_unpack(residual, indices, f.sparse_pack(residual, indices), 1.0)
    assert torch.equal(residual + sent, a)
    assert int((sent != 0).sum()) == indices.numel()


# ---------------------------------------------------------------------------------------------
# Bad input: every case raises naming the argument.

PACK_BAD = [
    ("values", TypeError, lambda f, a: f.sparse_pack(a.X.int(), a.IDX)),
    ("values", ValueError, lambda f, a: f.sparse_pack(a.X.view(2, 5), a.IDX)),
    ("indices", TypeError, lambda f, a: f.sparse_pack(a.X, a.IDX.int())),
    ("indices", ValueError, lambda f, a: f.sparse_pack(a.X, a.IDX.view(1, 2))),
    ("indices must lie", ValueError, lambda f, a: f.sparse_pack(a.X, a.t([0, 10]))),
    ("indices must lie", ValueError, lambda f, a: f.sparse_pack(a.X, a.t([-1]))),
    ("indices is on meta", ValueError, lambda f, a: f.sparse_pack(a.X, a.IDX.to("meta"))),
]

UNPACK_BAD = [
    ("residual", TypeError, lambda f, a: f.sparse_unpack(a.X.long(), a.IDX, a.X[:2].long(), 1.0)),
    ("values dtype", TypeError, lambda f, a: f.sparse_unpack(a.X.clone(), a.IDX, a.X[:2].half(), 1.0)),
    ("values length", ValueError, lambda f, a: f.sparse_unpack(a.X.clone(), a.IDX, a.X[:3], 1.0)),
    ("values length", ValueError, lambda f, a: f.sparse_unpack(a.X.clone(), a.t([1]), a.X[:2], 1.0)),
    ("residual must be contiguous", ValueError,
     lambda f, a: f.sparse_unpack(a.X.new_zeros(20)[::2], a.IDX, a.X[:2], 1.0)),
    ("indices must lie", ValueError, lambda f, a: f.sparse_unpack(a.X.clone(), a.t([3, 10]), a.X[:2], 1.0)),
    ("indices", TypeError, lambda f, a: f.sparse_unpack(a.X.clone(), a.IDX.float(), a.X[:2], 1.0)),
    ("values is on meta", ValueError, lambda f, a: f.sparse_unpack(a.X.clone(), a.IDX, a.X[:2].to("meta"), 1.0)),
    ("scale", TypeError, lambda f, a: f.sparse_unpack(a.X.clone(), a.IDX, a.X[:2], torch.tensor(1.0))),
]


@pytest.mark.parametrize("match,exc,call", PACK_BAD + UNPACK_BAD, ids=table_ids(PACK_BAD + UNPACK_BAD))
def test_bad_input_names_the_argument(backend, match, exc, call):
    assert_rejected(backend, exc, match, call)


def test_bad_input_does_not_modify_residual(backend):
    assert_rejected_leaves_residual(backend,
                                    lambda f, a, residual: f.sparse_unpack(residual, a.t([3, 10]), a.X[:2], 1.0))


# A direct torch.ops call (the schema's validate defaults to True) checks the indices in the op,
# once: the C++ binding on CPU, the Triton implementation on CUDA.
DIRECT_BAD = [
    ("sparse_pack", lambda op, a: op.sparse_pack(a.X, a.t([10]))),
    ("sparse_unpack", lambda op, a: op.sparse_unpack(a.X.clone(), a.t([-1]), a.X[:1], 1.0)),
]


@pytest.mark.parametrize("what,call", DIRECT_BAD, ids=table_ids(DIRECT_BAD))
def test_a_direct_op_call_checks_the_indices(backend, what, call):
    op = torch.ops.deft_kernels
    if backend.name == "triton":  # the Triton implementation as the dispatcher calls it, validate left at its default
        from deft_kernels import triton_ops as tk
        op = types.SimpleNamespace(sparse_pack=tk._sparse_pack, sparse_unpack=tk._sparse_unpack)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[-?1[0]?, -?1[0]?\]"):
        call(op, BadInputs(backend))


# ---------------------------------------------------------------------------------------------
# torch.library integration


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(seed, backend, dtype):
    n = 2103
    x = torch.randn(n).to(dtype).to(backend.device)
    idx = torch.randperm(n)[:50].to(backend.device)
    lib = torch.ops.deft_kernels
    torch.library.opcheck(lib.sparse_pack.default, (x, idx))
    values = torch.randn(50).to(dtype).to(backend.device)
    torch.library.opcheck(lib.sparse_unpack.default, (x.clone(), idx, values, 0.25))


@pytest.mark.parametrize("backend", ["cpu", "cuda"], indirect=True)
def test_torch_compile_fullgraph(seed, backend):
    # One DEFT step of the registered ops (accumulate, top-k, pack, unpack) in one graph.
    f = backend.fn
    sizes = [0, 1000, 3, 20_000]
    offsets = backend.offsets(sizes)
    n = sum(sizes)
    k = backend.tensor([0, 10, 1, 200])

    def step(grad, residual):
        f.accumulate_norms(grad, residual, offsets, validate=False)
        idx = f.segmented_topk(residual, offsets, k, validate=False)
        sent = f.sparse_unpack(residual, idx, f.sparse_pack(residual, idx, validate=False), 0.5, validate=False)
        return idx, sent

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad, residual = torch.randn(n, device=backend.device), torch.randn(n, device=backend.device)
    expected_residual = residual.clone()
    expected = step(grad, expected_residual)
    got = compiled(grad, residual)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(residual, expected_residual)
