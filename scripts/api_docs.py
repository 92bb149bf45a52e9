"""Write docs/api.md, the API reference, from the docstrings of the public names: everything in
``deft_kernels.__all__`` and in the ``__all__`` of the modules it lists.

    .venv/bin/python scripts/api_docs.py           # rewrite docs/api.md (after a docstring changes)
    .venv/bin/python scripts/api_docs.py --check   # exit 1 if docs/api.md is out of date

It documents the installed package (reinstall first). tests/test_api_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
PACKAGE = "deft_kernels"


def _signature(obj) -> str:
    """The call signature without annotations: the defaults are what a user needs, and evaluated
    annotations print differently from one torch release to the next."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _entry(qualname: str, obj, level: int) -> list[str]:
    lines = [f"{'#' * level} `{qualname}{_signature(obj) if callable(obj) else ''}`", ""]
    if callable(obj) or isinstance(obj, property):
        doc = inspect.getdoc(obj) or "(no docstring)"
    else:  # a constant: its value, not the docstring of its type
        doc = repr(obj)
    # As written (docstrings indent their argument lists, which Markdown would run together).
    lines += ["```text", doc, "```", ""]
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) or isinstance(member, property):
                lines += _entry(f"{qualname}.{name}", member, level + 1)
    return lines


def render() -> str:
    package = importlib.import_module(PACKAGE)
    out = ["# API reference", "",
           f"Generated from the docstrings by `scripts/api_docs.py` (do not edit by hand): the names in "
           f"`{PACKAGE}.__all__`, then those of each module it lists.", ""]
    modules = [(PACKAGE, package)]
    out += ["## `deft_kernels`", ""]
    listed = {getattr(package, name).__name__ for name in package.__all__
              if isinstance(getattr(package, name), types.ModuleType)}
    for name in package.__all__:
        obj = getattr(package, name)
        if isinstance(obj, types.ModuleType):
            modules.append((f"{PACKAGE}.{name}", obj))
        elif getattr(obj, "__module__", None) in listed:  # re-exported: documented with its module
            out += [f"### `{PACKAGE}.{name}`", "", f"The same as `{obj.__module__}.{name}`, below.", ""]
        else:
            out += _entry(f"{PACKAGE}.{name}", obj, 3)
    for qualname, module in modules[1:]:
        out += [f"## `{qualname}`", "", "```text", inspect.getdoc(module) or "", "```", ""]
        for name in module.__all__:
            out += _entry(f"{qualname}.{name}", getattr(module, name), 3)
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
