"""deft_kernels: fast kernels and torch.distributed integration for DEFT gradient sparsification.

Layers, data flowing one way (each module's docstring explains its terms):

- ``deft_kernels.ops``: validated entry points to the kernel ops (registered as
  ``torch.ops.deft_kernels.*``; C++/OpenMP on CPU, CUDA/Triton on GPU);
  ``deft_kernels.reference`` holds their plain-PyTorch oracle.
- ``deft_kernels.planning``: host-side DEFT planning (fragments, local k, bins, rotation), pure.
- ``deft_kernels.sparsifiers``: DEFT and the baselines on one interface, ``Sparsifier``: plan,
  selection and state, no communication.
- ``deft_kernels.driver``: the step, written once (error feedback, leader plan, selection, exchange),
  run over ``torch.distributed`` or for ``n`` ranks in one process; ``deft_kernels.transfer``: its
  host/device transfers.
- ``deft_kernels.simulate``: ``n`` workers in one process on the reference ops, the tests' oracle.
- Integrations: ``deft_kernels.hook`` (``DeftState`` + ``deft_hook``, a DDP communication hook) and
  ``deft_kernels.training`` (``GradientSparsifier``, for training loops without DDP).
- ``deft_kernels.metrics``: the hook's per-step, per-bucket figures (bytes, density, times, residual
  against gradient, bin imbalance) to a callback, CSV/JSONL, TensorBoard or Lightning's ``self.log``.
- ``deft_kernels.elastic``: surviving node failures under torchrun: a checkpoint per rank (DeftState
  included), resumption from the newest complete one, errors naming a lost peer.
- ``deft_kernels.benchmarks``: the ``deft-bench`` CLI, its models and layouts; not imported here.
"""

import torch  # noqa: F401  (loads libc10/libtorch before the extension)

from . import driver, ops, reference, sparsifiers
from .ops import accumulate_norms, segmented_topk, sparse_pack, sparse_unpack, threshold_select
from .hook import DeftState, deft_hook
from .training import GradientSparsifier
from . import elastic, metrics

__version__ = "0.1.0"

# The public names (help(deft_kernels) lists these; docs/api.md documents each).
__all__ = ["DeftState", "deft_hook", "GradientSparsifier", "accumulate_norms", "segmented_topk", "sparse_pack",
           "sparse_unpack", "threshold_select", "ops", "reference", "sparsifiers", "driver", "metrics", "elastic"]
