"""PEP 517 build backend of deft_kernels: scikit-build-core, behind a check that the build sees the
torch the extension will run with (see docs/building.md).

The C++ extension links against libtorch and loads only into the torch it was compiled against. A
build in an isolated environment (plain ``pip install .``, ``python -m build``, ``uv pip install .``)
sees no torch, or a second one that the build environment downloaded, never the user's. So the
wheel is built with ``pip install --no-build-isolation .``, and every other way stops here, before
CMake runs, with the command to use instead. Source distributions need no torch and are not checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

COMMAND = ("    pip install scikit-build-core pybind11 ninja\n"
           "    pip install --no-build-isolation .")

try:
    import scikit_build_core.build as _skbuild
except ImportError as e:
    raise ImportError(f"deft_kernels builds with scikit-build-core, which this environment lacks; run\n{COMMAND}") from e

from scikit_build_core.build import build_sdist, get_requires_for_build_sdist  # noqa: F401  (no torch needed)

# Where `import torch` leads in the interpreter's own environment: `-I` ignores PYTHONPATH, through
# which pip's isolated build environment replaces that environment's site-packages.
_FIND_TORCH = ("import importlib.util as u, importlib.metadata as m; s = u.find_spec('torch'); "
               "print(s.origin + '\\n' + m.version('torch') if s else '')")


def _torch_of_environment() -> tuple[str, str] | None:
    """(``torch/__init__.py`` path, version) of the interpreter's environment, or None."""
    out = subprocess.run([sys.executable, "-I", "-c", _FIND_TORCH], capture_output=True, text=True).stdout.split("\n")
    return (out[0], out[1]) if len(out) > 1 and out[0] else None


def check_torch() -> None:
    """Exit with the command to run unless this build sees exactly the environment's torch."""
    found = importlib.util.find_spec("torch")
    environment = _torch_of_environment()
    if found is not None and (environment is None or os.path.samefile(found.origin, environment[0])):
        return  # the environment's torch (or one on PYTHONPATH, which the user chose)
    if environment is None:
        problem = (f"no torch is installed for {sys.executable}. Install the torch you will use first "
                   "(e.g. pip install torch, or a CUDA build from pytorch.org), then run")
    elif found is None:
        problem = (f"this is an isolated build: it cannot see the torch {environment[1]} of {sys.executable}, "
                   "which the extension must be compiled against. Build it in that environment:")
    else:
        problem = (f"this build sees the torch in {os.path.dirname(found.origin)}, not the torch {environment[1]} "
                   f"of {sys.executable} that the extension will run with. Build it in that environment:")
    sys.exit(f"deft_kernels: {problem}\n{COMMAND}\n(docs/building.md explains why.)")


def get_requires_for_build_wheel(config_settings=None):
    check_torch()
    return _skbuild.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    check_torch()
    return _skbuild.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_torch()
    return _skbuild.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check_torch()
    return _skbuild.build_editable(wheel_directory, config_settings, metadata_directory)


if hasattr(_skbuild, "prepare_metadata_for_build_wheel"):
    prepare_metadata_for_build_wheel = _skbuild.prepare_metadata_for_build_wheel
    prepare_metadata_for_build_editable = _skbuild.prepare_metadata_for_build_editable
