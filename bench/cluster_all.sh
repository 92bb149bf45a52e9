#!/usr/bin/env bash
# Every measurement on the emulated cluster (docs/cluster.md), as committed under bench/results/:
# step time per (model, nodes, bandwidth) with bench/cluster_steps.py, then time to accuracy with
# bench/cluster_convergence.py, then the tables and plots. Needs root and iproute2; about 45 min on a
# 2-core machine. PYTHON picks the interpreter (default: .venv/bin/python, else python3); OUT the
# folder (default bench/results: this script regenerates the committed files; git diff shows what moved).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/results}
steps() { "$PYTHON" bench/cluster_steps.py --out "$OUT" "$@"; }

for model in resnet18 ncf; do
  for nodes in 2 4; do
    for bw in 100mbit 1gbit 10gbit; do
      if [ "$model $nodes $bw" = "resnet18 4 100mbit" ]; then
        # all-reduce takes ~6 s a step here: two launches, each under its timeout
        steps --model $model --nodes $nodes --bandwidth $bw --tag _dense --timeout 540 \
          --methods compute sync allreduce powersgd
        steps --model $model --nodes $nodes --bandwidth $bw --tag _sparse --timeout 540 \
          --methods compute sync topk:0.01 deft:0.01 topk:0.001 deft:0.001
      else
        steps --model $model --nodes $nodes --bandwidth $bw --timeout 480
      fi
    done
  done
done
steps --report
for nodes in 2 4; do
  "$PYTHON" bench/cluster_convergence.py --out "$OUT" --nodes $nodes --bandwidth 1gbit --timeout 540
done
"$PYTHON" bench/cluster_convergence.py --out "$OUT" --report
