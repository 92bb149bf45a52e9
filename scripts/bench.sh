#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job. Until the worker-count benchmark lands this is the
# CPU demo of the ops on the ResNet-50 layout; extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/ops_demo.py "$@"
