"""Micro-benchmarks of each op against what a user would write in plain torch, on the ResNet-50
layout at d = 1% (see bench/common.py for the k rule).

    .venv/bin/python -m pytest bench/ [--benchmark-json out.json]

(`pytest bench/` collects only this file: the other scripts here are not test_*.py; the default
`pytest` / `pytest tests` never reaches bench/, see testpaths in pyproject.toml.)

Each benchmark group (one op, one device) prints as one table; the parenthesised numbers are the
ratios to the fastest row. CUDA rows run when torch.cuda.is_available() and are skipped otherwise.
"""

import pytest
import torch

from common import (accumulate_norms_torch, indices_at_least_torch, resnet50_problem, sparse_unpack_torch,
                    topk_per_fragment, topk_whole)
from deft_kernels import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# Rounds are fixed instead of auto-calibrated: the slowest alternative takes about half a second.
ROUNDS = 7


@pytest.fixture(scope="module", params=DEVICES)
def problem(request):
    return resnet50_problem(request.param)


def run(benchmark, group, fn, *args):
    benchmark.group = f"{group} [{args[0].device.type}]"

    def call():
        result = fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        return result

    return benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)


def test_segmented_topk_deft(benchmark, problem):
    p = problem
    run(benchmark, "segmented_topk", ops.segmented_topk, p.residual, p.offsets, p.k)


def test_segmented_topk_torch_per_fragment(benchmark, problem):
    p = problem
    run(benchmark, "segmented_topk", topk_per_fragment, p.residual, p.sizes, p.k.tolist())


def test_segmented_topk_torch_whole_vector(benchmark, problem):
    p = problem
    run(benchmark, "segmented_topk", topk_whole, p.residual, int(p.k.sum()))


def test_accumulate_norms_deft(benchmark, problem):
    p = problem
    run(benchmark, "accumulate_norms", ops.accumulate_norms, p.grad, p.residual.clone(), p.offsets)


def test_accumulate_norms_torch_add_foreach_norm(benchmark, problem):
    p = problem
    run(benchmark, "accumulate_norms", accumulate_norms_torch, p.grad, p.residual.clone(), p.sizes)


def test_accumulate_bf16_into_fp32_deft_in_place(benchmark, problem):
    p = problem
    run(benchmark, "accumulate_norms bf16 into fp32", ops.accumulate_norms, p.grad.bfloat16(), p.residual.clone(),
        p.offsets)


def copy_then_accumulate(grad, residual, work, offsets):
    """How the driver accumulated a 16-bit gradient before the mixed pair: copied into an fp32 work
    buffer, which then takes the residual."""
    work.copy_(grad)
    return ops.accumulate_norms(residual, work, offsets)


def test_accumulate_bf16_into_fp32_copy_to_work_buffer(benchmark, problem):
    p = problem
    run(benchmark, "accumulate_norms bf16 into fp32", copy_then_accumulate, p.grad.bfloat16(), p.residual.clone(),
        torch.empty_like(p.residual), p.offsets)


def test_threshold_select_deft(benchmark, problem):
    p = problem
    run(benchmark, "threshold_select", ops.threshold_select, p.residual, p.offsets.cpu(), p.thresholds)


def test_threshold_select_torch_elementwise_nonzero(benchmark, problem):
    p = problem
    run(benchmark, "threshold_select", indices_at_least_torch, p.residual, p.threshold)


def test_sparse_pack_deft(benchmark, problem):
    p = problem
    run(benchmark, "sparse_pack", ops.sparse_pack, p.residual, p.indices)


def test_sparse_pack_torch_index_select(benchmark, problem):
    p = problem
    run(benchmark, "sparse_pack", torch.index_select, p.residual, 0, p.indices)


def test_sparse_unpack_deft(benchmark, problem):
    p = problem
    run(benchmark, "sparse_unpack", ops.sparse_unpack, p.residual.clone(), p.indices, p.packed, 0.5)


def test_sparse_unpack_torch_zeros_index_put(benchmark, problem):
    p = problem
    run(benchmark, "sparse_unpack", sparse_unpack_torch, p.residual.clone(), p.indices, p.packed, 0.5)
