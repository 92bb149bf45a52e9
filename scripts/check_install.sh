#!/usr/bin/env bash
# The README's install, done as a new user does it, in a fresh virtual environment (nothing from
# .venv or the build tree): the wrong way (plain `pip install .`, an isolated build) must stop within
# seconds naming the command to run; the documented way must give a working deft_kernels, whose
# deft-bench names its [bench] extra when that is missing. CI runs this after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The torch to install first; scripts/setup.sh pins the same CPU build.
TORCH=${DEFT_TORCH:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { echo "check_install: $*"; }
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }

# The sources a user would have: tracked and new files, no build outputs, no .venv.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - | tar xf - -C "$work/src"
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "$TORCH"
cd "$work/src"

start=$SECONDS
if "${pip[@]}" install . >"$work/wrong.log" 2>&1; then
  fail "pip install . (build isolation) succeeded; it builds against a torch other than the environment's"
fi
took=$((SECONDS - start))
grep -q "pip install --no-build-isolation \." "$work/wrong.log" || { cat "$work/wrong.log"; fail "no command named"; }
[ "$took" -le 60 ] || fail "pip install . took ${took}s to fail (limit 60 s)"
say "pip install . (isolated) stopped after ${took}s naming the command to run"

start=$SECONDS
"${pip[@]}" install -q scikit-build-core pybind11 ninja
"${pip[@]}" install -q --no-build-isolation .
say "documented install: $((SECONDS - start))s"

cd "$work"
"$work/venv/bin/python" - <<'EOF'
import importlib.resources
import torch
import deft_kernels
from deft_kernels import reference

x = torch.randn(1000)
offsets = torch.tensor([0, 400, 1000])
k = torch.tensor([5, 7])
assert torch.equal(deft_kernels.segmented_topk(x, offsets, k), reference.segmented_topk(x, offsets, k))
model = torch.nn.Linear(20, 3)
model(torch.randn(8, 20)).sum().backward()
stats = deft_kernels.GradientSparsifier(model, sparsifier="deft", density=0.1, warmup_steps=0).step()
assert stats[0].sent >= deft_kernels.sparsifiers.build("deft", 0.1).budget(63), stats
assert importlib.resources.files("deft_kernels").joinpath("py.typed").is_file()
print("check_install: smoke test passed:", deft_kernels.__version__, "on torch", torch.__version__)
EOF

# Installed without its [bench] extra, deft-bench must say so at once, before any work.
if "$work/venv/bin/deft-bench" --workers 1 >"$work/bench.log" 2>&1; then
  fail "deft-bench ran without matplotlib and tqdm"
fi
grep -q "deft_kernels\[bench\]" "$work/bench.log" || { cat "$work/bench.log"; fail "deft-bench did not name [bench]"; }
say "deft-bench without [bench]: $(tail -n 1 "$work/bench.log")"
