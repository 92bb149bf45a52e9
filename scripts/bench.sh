#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the worker-count benchmark (deft-bench) with its
# defaults, writing deft-bench-results/worker_count_<model>_cpu.{txt,json,png} (git ignores the folder;
# --out bench/results regenerates the committed files). Extra arguments go to it
# (see `deft-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m deft_kernels.bench "$@"
