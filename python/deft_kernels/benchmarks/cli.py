"""``deft-bench``: one command, several modes.

    deft-bench [options]          per-worker selection time vs the number of workers (the default
                                  mode, :mod:`~deft_kernels.benchmarks.worker_count`; also
                                  ``deft-bench worker-count [options]``)
    deft-bench MODE [options]     another mode, named in ``MODES``; ``deft-bench --help`` lists them
                                  and ``deft-bench MODE --help`` gives a mode's options

A mode is a module with ``main(argv: list[str] | None) -> int``; it is imported only when asked for,
so a mode's dependencies (iproute2, matplotlib, ...) never burden the others. A first argument that
is neither a mode nor an option stops with status 2, naming the modes.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple


class Mode(NamedTuple):
    module: str  # holds main(argv)
    summary: str  # one line for `deft-bench --help`


#: The name of the mode that runs when none is named.
DEFAULT_MODE = "worker-count"
MODES: dict[str, Mode] = {
    DEFAULT_MODE: Mode("deft_kernels.benchmarks.worker_count",
                       "per-worker selection time vs the number of workers, every sparsifier (the default)"),
    "project": Mode("deft_kernels.benchmarks.project",
                    "the training step predicted on n workers and a network: does DEFT beat all-reduce there?"),
    "cluster": Mode("deft_kernels.benchmarks.cluster",
                    "an emulated multi-node cluster on this machine (network namespaces, shaped links; root)"),
}

__all__ = ["MODES", "DEFAULT_MODE", "Mode", "modes_help", "main"]


def modes_help() -> str:
    """The modes, a line each, as ``deft-bench --help`` shows them."""
    width = max(map(len, MODES))
    lines = [f"  {name:<{width}}  {mode.summary}" for name, mode in MODES.items()]
    return "\n".join(["modes (deft-bench MODE [options]; deft-bench MODE --help for a mode's options):", *lines])


def _unknown_mode(word: str) -> int:
    near = difflib.get_close_matches(word, list(MODES), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    print(f"deft-bench: error: unknown mode {word!r}{hint}: choose from {', '.join(MODES)} (none named: "
          f"{DEFAULT_MODE}); deft-bench --help describes them", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = DEFAULT_MODE
    if argv and not argv[0].startswith("-"):
        if argv[0] not in MODES:
            return _unknown_mode(argv[0])
        name = argv.pop(0)
    return importlib.import_module(MODES[name].module).main(argv)


if __name__ == "__main__":
    sys.exit(main())
