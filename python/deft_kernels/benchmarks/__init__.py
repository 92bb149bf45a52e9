"""Benchmark code, kept out of the core import path (``import deft_kernels`` does not load it):

- :mod:`~deft_kernels.benchmarks.cli`: ``deft-bench``'s modes (``deft-bench MODE ...``), the default
  being :mod:`~deft_kernels.benchmarks.worker_count`: per-worker selection time versus the
  number of workers (the DEFT paper's headline measurement);
- :mod:`~deft_kernels.benchmarks.models`: the built-in models whose real gradients it measures;
- :mod:`~deft_kernels.benchmarks.layouts`: parameter layouts of reference models (sizes only), for
  the op benchmarks.

``python -m deft_kernels.benchmarks`` runs ``deft-bench``.
"""
