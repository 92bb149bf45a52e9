import pytest
import torch

from deft_kernels import ops, reference


def test_segmented_topk_matches_reference(seed):
    x = torch.randn(1000)
    offsets = torch.tensor([0, 10, 10, 500, 1000])
    k = torch.tensor([3, 0, 490, 7])
    assert torch.equal(ops.segmented_topk(x, offsets, k), reference.segmented_topk(x, offsets, k))


def test_segmented_topk_rejects_negative_k():
    with pytest.raises(ValueError, match=r"k\[0\]"):
        ops.segmented_topk(torch.randn(10), torch.tensor([0, 10]), torch.tensor([-1]))
