#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest exits 5 when it collects nothing; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest -q tests "$@"
