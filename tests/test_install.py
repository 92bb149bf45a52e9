"""The build backend (backend/deft_build.py) lets a wheel be built only against the torch of the
environment it installs into, and otherwise stops at once with the command to run. The whole
install, in a fresh virtual environment, is scripts/check_install.sh (run by CI)."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "pip install --no-build-isolation ."

pytest.importorskip("scikit_build_core")


@pytest.fixture(scope="module")
def backend():
    spec = importlib.util.spec_from_file_location("deft_build", ROOT / "backend" / "deft_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyproject_cannot_pull_a_second_torch():
    import tomllib

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert not [r for r in build["requires"] if r.split(">")[0].split("=")[0].strip() == "torch"]
    assert build["build-backend"] == "deft_build" and build["backend-path"] == ["backend"]


def test_environment_torch_is_accepted(backend):
    backend.check_torch()
    origin, version = backend._torch_of_environment()
    assert os.path.samefile(origin, torch.__file__) and version == torch.__version__


def test_second_torch_seen_by_the_build_is_refused(tmp_path):
    """What an isolated build with torch in its requirements did: CMake found another torch than
    the environment's (here a stand-in package ahead on PYTHONPATH, as pip's overlay is)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("__version__ = '0.0.0'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "backend")]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import deft_build; deft_build.check_torch()"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30
    assert done.returncode == 1
    assert f"this build sees the torch in {tmp_path / 'torch'}" in done.stderr
    assert f"the torch {torch.__version__} of {sys.executable}" in done.stderr and COMMAND in done.stderr


def test_isolated_build_without_torch_names_the_command(backend, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        backend.check_torch()
    message = str(exc.value.code)
    assert f"isolated build: it cannot see the torch {torch.__version__} of {sys.executable}" in message
    assert COMMAND in message and "pip install scikit-build-core pybind11 ninja" in message


def test_environment_without_torch_says_to_install_it_first(backend, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(backend, "_torch_of_environment", lambda: None)
    with pytest.raises(SystemExit) as exc:
        backend.check_torch()
    message = str(exc.value.code)
    assert f"no torch is installed for {sys.executable}" in message and COMMAND in message


def test_sdist_needs_no_torch(backend):
    import scikit_build_core.build

    assert backend.build_sdist is scikit_build_core.build.build_sdist
