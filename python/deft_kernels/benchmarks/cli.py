"""``deft-bench``: one command, several modes.

    deft-bench [options]          per-worker selection time vs the number of workers (the default
                                  mode, :mod:`~deft_kernels.benchmarks.worker_count`)
    deft-bench MODE [options]     another mode, named in ``MODES``

A mode is a module with ``main(argv: list[str] | None) -> int``; it is imported only when asked for,
so a mode's dependencies (iproute2, matplotlib, ...) never burden the others.
"""

from __future__ import annotations

import importlib
import sys

# mode name -> module holding its main(argv)
MODES: dict[str, str] = {
    "cluster": "deft_kernels.benchmarks.cluster",  # an emulated multi-node cluster (netns, veth, tc tbf)
}

__all__ = ["MODES", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MODES:
        return importlib.import_module(MODES[argv[0]]).main(argv[1:])
    from .worker_count import main as worker_count_main

    return worker_count_main(argv)


if __name__ == "__main__":
    sys.exit(main())
