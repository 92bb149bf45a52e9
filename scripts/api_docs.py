"""Write docs/api.md, the API reference, from the docstrings of the public names: everything in
``deft_kernels.__all__`` and in the ``__all__`` of the modules it lists. Users first: the entry
points a training script calls and what they report (``StepStats``, ``compression_stats()``, the
metrics; each dataclass field with the comment beside it in the source), then the internals under
their own heading.

    .venv/bin/python scripts/api_docs.py           # rewrite docs/api.md (after a docstring changes)
    .venv/bin/python scripts/api_docs.py --check   # exit 1 if docs/api.md is out of date

It documents the installed package (reinstall first). tests/test_api_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
PACKAGE = "deft_kernels"
#: Modules of ``deft_kernels.__all__`` documented for users, after the entry points; the others are
#: the internals.
USER_MODULES = ("metrics", "elastic")


def _signature(obj) -> str:
    """The call signature without annotations: the defaults are what a user needs, and evaluated
    annotations print differently from one torch release to the next."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def field_docs(cls) -> dict[str, tuple[str, str]]:
    """``{field: (type, comment)}`` of dataclass ``cls``, the comment being the ``# ...`` after the
    field in the source, continued on comment lines right below it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, tuple[str, str]] = {}
    current = None
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines()[1:]:
        field = re.fullmatch(r"    (\w+): ([^#=]+?)\s*(?:=[^#]*)?(?:#\s?(.*))?", line)
        if field and field.group(1) in names:
            current = field.group(1)
            docs[current] = (field.group(2), field.group(3) or "")
        elif current and re.fullmatch(r"    # .*", line):
            kind, text = docs[current]
            docs[current] = (kind, f"{text} {line.strip()[2:]}")
        else:
            current = None
    return docs


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    return [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}",
            *(f"| {' | '.join(map(cell, row))} |" for row in rows), ""]


def _entry(qualname: str, obj, level: int) -> list[str]:
    lines = [f"{'#' * level} `{qualname}{_signature(obj) if callable(obj) else ''}`", ""]
    if callable(obj) or isinstance(obj, property):
        doc = inspect.getdoc(obj) or "(no docstring)"
    else:  # a constant: its value, not the docstring of its type
        doc = repr(obj)
    # As written (docstrings indent their argument lists, which Markdown would run together).
    lines += ["```text", doc, "```", ""]
    if dataclasses.is_dataclass(obj):
        lines += _table(("field", "type", "meaning"),
                        [(f"`{name}`", f"`{kind}`", text) for name, (kind, text) in field_docs(obj).items()])
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) or isinstance(member, property):
                lines += _entry(f"{qualname}.{name}", member, level + 1)
    return lines


def _module(qualname: str, module, level: int, elsewhere: dict[str, str]) -> list[str]:
    """A module's docstring and each of its ``__all__``, those in ``elsewhere`` as a pointer there."""
    out = [f"{'#' * level} `{qualname}`", "", "```text", inspect.getdoc(module) or "", "```", ""]
    for name in module.__all__:
        if f"{qualname}.{name}" in elsewhere:
            out += [f"{'#' * (level + 1)} `{qualname}.{name}`", "", elsewhere[f"{qualname}.{name}"], ""]
        else:
            out += _entry(f"{qualname}.{name}", getattr(module, name), level + 1)
    return out


def _reports() -> list[str]:
    """What the entry points report: ``StepStats`` and ``compression_stats()``, with units."""
    from deft_kernels._integration import COMPRESSION_STATS
    from deft_kernels.sparsifiers import StepStats

    return ["### What a step reports", "",
            "`DeftState.last_stats` (one per DDP bucket) and `GradientSparsifier.step()` (one per dtype group) give "
            "each sparse step's `StepStats`; `compression_stats()` sums them; `deft_kernels.metrics`, below, turns "
            "them into per-iteration figures for a logger.", "",
            *_entry(f"{PACKAGE}.sparsifiers.StepStats", StepStats, 4),
            "#### `compression_stats()`", "",
            "`DeftState.compression_stats()` and `GradientSparsifier.compression_stats()`: a dict of totals over this "
            "rank's sparse steps (the warm-up is not counted), every bucket or dtype group summed.", "",
            *_table(("key", "meaning, unit"), [(f"`{key}`", text) for key, text in COMPRESSION_STATS.items()])]


def render() -> str:
    package = importlib.import_module(PACKAGE)
    listed = {getattr(package, name).__name__ for name in package.__all__
              if isinstance(getattr(package, name), types.ModuleType)}
    modules = {name: getattr(package, name) for name in package.__all__
               if isinstance(getattr(package, name), types.ModuleType)}
    entry_points = [name for name in package.__all__
                    if name not in modules and getattr(getattr(package, name), "__module__", None) not in listed]
    reexported = [name for name in package.__all__ if name not in modules and name not in entry_points]
    out = ["# API reference", "",
           "Generated from the docstrings by `scripts/api_docs.py` (do not edit by hand): the names in "
           f"`{PACKAGE}.__all__` and in the `__all__` of each module it lists. [For users](#for-users): what a "
           "training script calls (`DeftState` and `deft_hook` for DDP, `GradientSparsifier` for a plain loop), "
           "what they report, the metrics and the checkpoints. [Internals](#internals): the ops, their reference, "
           "the sparsifiers (each one's options: what `DeftState(**kwargs)` passes on) and the step driver.", "",
           "## For users", ""]
    for name in entry_points:
        out += _entry(f"{PACKAGE}.{name}", getattr(package, name), 3)
    out += _reports()
    for name in USER_MODULES:
        out += _module(f"{PACKAGE}.{name}", modules[name], 3, {})
    out += ["## Internals", "",
            "The layers under the entry points, for extending or checking the library: the kernel ops "
            f"(`{PACKAGE}.ops`, also at the top level), their plain-PyTorch oracle, the sparsifiers and the step "
            "driver.", ""]
    out += [line for name in reexported for line in
            (f"### `{PACKAGE}.{name}`", "", f"The same as `{getattr(package, name).__module__}.{name}`, below.", "")]
    shown = {f"{PACKAGE}.sparsifiers.StepStats": "Under [For users](#for-users), What a step reports."}
    for name, module in modules.items():
        if name not in USER_MODULES:
            out += _module(f"{PACKAGE}.{name}", module, 3, shown)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run .venv/bin/python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
