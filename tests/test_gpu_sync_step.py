"""The sync contract on a GPU (docs/exchange.md), run under ``torch.cuda.set_sync_debug_mode("error")``,
which turns every synchronising call (a ``.item()``, a blocking copy, an op whose output size depends
on the data) into an error, except inside deft_kernels.transfer (``to_host``, and a ``Later`` read):

- DEFT's default step (the plan one step ahead) after its first: no ``to_host`` read at all; its
  status block and norms go to the host without blocking and are read one step later, when their
  copy is done (``transfer.LATER_READS``);
- ``plan="leader"`` (the paper's protocol): two ``to_host`` reads per rank (the header or plan, then
  the status block).

Skipped without CUDA. Status: NOT RUN YET (no GPU on the development machines). The ops' side of
the contract (host metadata next to CUDA values) is tests/test_host_metadata.py's and
tests/test_gpu_sync_free.py's; tests/test_plan_protocols.py runs the step one step ahead on ``meta``
tensors (no data: any read raises) and tests/test_driver.py counts the reads on the CPU.
"""

import pytest
import torch

from deft_kernels import driver
from deft_kernels.sparsifiers import DEFT
from deft_kernels.transfer import HOST_READS, LATER_READS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = [4096, 300, 70000, 9, 1200, 25000]
READS = {"ahead": 0, "leader": 2}  # to_host reads per rank per step after the first


def _grads(n: int, step: int, dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(sum(SIZES), generator=gen).to(dtype).cuda() for _ in range(n)]


@pytest.mark.parametrize("plan", sorted(READS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_deft_step_syncs_only_where_its_protocol_says(n, dtype, plan):
    ranks = [DEFT(0.01, plan=plan) for _ in range(n)]
    driver.simulate_step(ranks, _grads(n, 0, dtype), sizes=SIZES)  # the first step also agrees on the setup
    grads = [_grads(n, step, dtype) for step in range(1, 4)]  # uploading them synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            before, later = HOST_READS.count, LATER_READS.count
            results = driver.simulate_step(ranks, step_grads, sizes=SIZES)
            assert HOST_READS.count - before == READS[plan] * n
            assert LATER_READS.count - later == (n if plan == "ahead" else 0)  # the previous step's, read now
            assert all(r.out.is_cuda and r.stats.sent == results[0].stats.sent for r in results)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(sp.residual.is_cuda for sp in ranks)
