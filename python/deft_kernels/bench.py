"""``python -m deft_kernels.bench``: the documented short name of ``deft-bench``
(:mod:`deft_kernels.benchmarks.worker_count`)."""

import sys

from .benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
