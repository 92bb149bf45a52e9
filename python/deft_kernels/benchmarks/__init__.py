"""Benchmark code, kept out of the core import path (``import deft_kernels`` does not load it):

- :mod:`~deft_kernels.benchmarks.cli`: ``deft-bench``'s modes (``deft-bench MODE ...``), the default
  being :mod:`~deft_kernels.benchmarks.worker_count`: per-worker selection time versus the
  number of workers (the DEFT paper's headline measurement);
- :mod:`~deft_kernels.benchmarks.models`: the built-in models whose real gradients it measures;
- :mod:`~deft_kernels.benchmarks.layouts`: parameter layouts of reference models (sizes only), for
  the op benchmarks.

``python -m deft_kernels.benchmarks`` runs ``deft-bench``.

Every benchmark, ``deft-bench`` and the repository's ``bench/`` scripts, writes its results where
``--out`` says, by default into :data:`DEFAULT_OUT` of the current directory, which the repository's
``.gitignore`` lists: a run in a clone never rewrites the committed results under ``bench/results/``,
which the commands in BENCHMARKS.md regenerate with an explicit ``--out bench/results``.
"""

#: The folder, relative to the current directory, that the benchmarks write into unless told otherwise.
DEFAULT_OUT = "deft-bench-results"
