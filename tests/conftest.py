import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; the variable
# must be set before any @triton.jit decorator runs, i.e. before deft_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from op_cases import BACKENDS  # noqa: E402  (imports nothing of deft_kernels)


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed on failure (pytest shows captured stdout) and settable with
    DEFT_TEST_SEED to replay a failure."""
    value = int(os.environ.get("DEFT_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    print(f"seed={value} (replay with DEFT_TEST_SEED={value})")
    return value


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend an op test runs on (see tests/op_cases.py); skipped where it is unavailable."""
    from op_cases import make_backend

    return make_backend(request.param)


@pytest.fixture
def world_of_one():
    """A gloo group of one rank in this process (DDP needs one), destroyed after the test."""
    from datetime import timedelta

    import torch.distributed as dist
    from multiproc import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()
