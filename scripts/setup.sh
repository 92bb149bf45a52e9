#!/usr/bin/env bash
# Create .venv (reusing a torch the machine already has, e.g. a CUDA build on a GPU box), install
# the build and test tools, and build + install deft_kernels from a clean build tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # Pinned: on the CPU machines this resolves to the local CPU build; an unpinned torch would pull
  # the newest release with its CUDA packages.
  pip_install torch==2.13.0
fi
"$VPY" -c "import triton" 2>/dev/null || pip_install triton==3.9.0
# The documented install (README, docs/building.md): build tools first, then the package built
# against this environment's torch, with the test extra (the suite's and the benchmarks' packages).
pip_install pybind11 scikit-build-core ninja
rm -rf build
pip_install --no-build-isolation ".[test]"
"$VPY" -c "import torch, deft_kernels; print('deft_kernels', deft_kernels.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
