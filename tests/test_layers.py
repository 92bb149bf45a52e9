"""The package's layers import one way: the algorithms (``sparsifiers``, with the ops, the planner and
the transfers they use) <- the step driver (``driver``) <- the integrations (the DDP hook,
``GradientSparsifier``) and the tools on top (the simulation, the benchmarks).

Two checks: every import statement of every module, those inside functions included (a lazy import
is still a dependency), points down or sideways; and, in a fresh interpreter where the driver and
the integrations cannot be imported at all, the algorithms import and run their own work."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deft_kernels

PACKAGE = Path(deft_kernels.__file__).parent

#: Layer of each module (by its path under the package), lowest first; a module may import its own
#: layer and the layers below.
LAYERS = {
    0: ("_C", "_checks", "ops", "reference", "planning", "transfer", "triton_ops"),
    1: ("sparsifiers",),
    2: ("driver",),
    3: ("_integration", "_ddp", "_engine", "hook", "training", "simulate", "benchmarks", "bench", "__init__"),
}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    # Not a module listed here: a name the package's __init__ defines (``from .. import __version__``).
    return next((level for level, names in LAYERS.items() if top in names), 3)


def _imports(source: str, module: str) -> set[str]:
    """The package modules that ``source`` (the text of ``module``, dotted, relative to the package)
    imports anywhere, as dotted names relative to the package."""
    parts = module.split(".")
    here = parts if parts[-1] == "__init__" else parts[:-1]  # the package the module is in
    here = here[:-1] if parts[-1] == "__init__" else here
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, *node.module.split(".")]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found.update(n.removeprefix("deft_kernels.") for n in names if n and n.startswith("deft_kernels."))
    return {m for m in found if m}


def test_every_import_points_down_or_sideways():
    upward = []
    files = [Path(d) / f for d, _, names in os.walk(PACKAGE, followlinks=True) for f in names if f.endswith(".py")]
    assert len(files) > 25
    for path in sorted(files):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        level = _layer(module)
        upward += [f"{module} (layer {level}) imports {target} (layer {_layer(target)})"
                   for target in sorted(_imports(path.read_text(), module)) if _layer(target) > level]
    assert not upward, upward


def test_the_checks_are_one_module_that_the_kernels_share():
    """The argument checks live in ``_checks``, which imports no other module of the package; the
    Triton kernels use it and never reach into ``ops`` (whose fallback registration looks the Triton
    implementations up in ``triton_ops.CUDA_IMPLS``, not by name)."""
    def source(name):
        return (PACKAGE / f"{name}.py").read_text()

    assert _imports(source("_checks"), "_checks") == set()
    assert "ops" not in _imports(source("triton_ops"), "triton_ops")
    assert "_checks" in _imports(source("triton_ops"), "triton_ops") & _imports(source("ops"), "ops")
    assert "def check_" not in source("ops") and "def _check_" not in source("ops")


def test_the_import_check_finds_lazy_and_relative_imports():
    source = "from .. import ops\nfrom .base import Sparsifier\n\ndef f():\n    from ..driver import step\n"
    assert _imports(source, "sparsifiers.deft") == {"ops", "sparsifiers.base", "driver"}
    assert _imports("from .program import x\nimport deft_kernels.hook\n", "driver.__init__") == \
        {"driver.program", "hook"}


@pytest.mark.slow
def test_the_algorithms_import_and_run_without_the_driver():
    """A fresh interpreter in which the driver and the integrations do not exist: the package is
    entered without its __init__ (which imports everything), and the algorithms still import and
    plan, select and pack."""
    code = f"""
import importlib.util, sys, types
import torch
pkg = types.ModuleType("deft_kernels")
pkg.__path__ = [{str(PACKAGE)!r}]
sys.modules["deft_kernels"] = pkg
for blocked in ("driver", "hook", "training", "_integration", "simulate"):
    sys.modules["deft_kernels." + blocked] = None  # importing it raises ImportError
from deft_kernels.sparsifiers import build
from deft_kernels.sparsifiers.base import Layout
sp = build("deft", 0.1)
sp.start(Layout(2, (60, 40), torch.float32, torch.device("cpu")))
acc = torch.randn(100)
norms = sp.kernels.accumulate_norms(torch.zeros(100), acc, sp.offsets)
plan = sp.plan(acc, norms, sp.offsets, 2, 0)
sel = sp.select(acc, norms, sp.offsets, plan, 0, 2, 0)
loaded = sorted(m for m, mod in sys.modules.items() if m.startswith("deft_kernels") and mod is not None)
print(int(sp.kernels.sparse_pack(acc, sel).numel()), loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, modules = done.stdout.split(" ", 1)
    assert int(count) > 0
    assert "driver" not in modules and "hook" not in modules, modules


def test_the_triton_table_covers_every_op_with_its_schema_arguments():
    """Each op that can fall back to Triton on CUDA has an entry in ``triton_ops.CUDA_IMPLS`` that
    takes exactly the op's schema arguments (the dispatcher passes them all, ``validate`` included)."""
    pytest.importorskip("triton")
    import inspect

    import torch

    from deft_kernels import ops, triton_ops

    assert set(triton_ops.CUDA_IMPLS) == set(ops._TRITON_FALLBACK_OPS)
    for name, impl in triton_ops.CUDA_IMPLS.items():
        schema = [a.name for a in getattr(torch.ops.deft_kernels, name).default._schema.arguments]
        params = [p for p in inspect.signature(impl).parameters.values() if p.name != "block"]
        assert [p.name for p in params] == schema, name
