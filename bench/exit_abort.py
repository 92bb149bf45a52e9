"""How often a 2-node torchrun of tests/cluster_ddp_worker.py ends badly, and what the worker's
release of DDP before ``destroy_process_group`` changes (docs/operations.md, recipe step 6):

    sudo python bench/exit_abort.py --runs 40                         # the worker as tested
    sudo python bench/exit_abort.py --runs 40 --keep-ddp              # DDP left to interpreter shutdown
    sudo python bench/exit_abort.py --runs 40 --keep-ddp --no-hook    # the same, plain DDP (no comm hook)

Each run: a fresh 2-node emulated cluster (1 Gb/s links), one torchrun per node, 4 DDP steps, a
deadline of ``--timeout`` seconds. A run is bad when a node's torchrun exits non-zero or the
deadline passes (the other node's agent then waits in its exit barrier); a rank that printed
"terminate called without an active exception" aborted at exit. Prints a line per bad run (each
node's exit code and the last line of its stderr) and a summary; ``--json`` also writes one.
Needs root and iproute2, like every emulated-cluster command (deft_kernels.benchmarks.cluster).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "tests" / "cluster_ddp_worker.py"
ABORT = "terminate called without an active exception"  # what the aborted rank prints


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--keep-ddp", action="store_true", help="the worker leaves DDP alive to interpreter shutdown")
    p.add_argument("--no-hook", action="store_true", help="plain DDP: the worker registers no comm hook")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per run before both nodes are killed")
    p.add_argument("--json", metavar="PATH", help="write the summary here as well")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    from deft_kernels.benchmarks.cluster import Cluster, check_available
    from deft_kernels.benchmarks.worker_count import machine_info

    missing = check_available()
    if missing:
        print(f"exit_abort: {missing}", file=sys.stderr)
        return 2
    env = {"PYTHONFAULTHANDLER": "1", "DEFT_WORKER_HOOK": "0" if args.no_hook else "1",
           "DEFT_WORKER_RELEASE": "0" if args.keep_ddp else "1"}
    command = "python bench/exit_abort.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = machine_info("cpu")
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine['cpu_model']} "
          f"({machine['cpus_usable']} CPUs), torch {machine['torch']}", flush=True)
    bad, aborts = [], 0
    for run in range(args.runs):
        with Cluster(2, bandwidth="1gbit", prefix="dkexit") as c:
            try:
                results = c.run(lambda n: c.torchrun_argv(n.index, [str(WORKER), "4"], port=29441),
                                timeout=args.timeout, env=env)
                timed_out = False
            except subprocess.TimeoutExpired as e:
                results, timed_out = e.results, True
        aborted = [ABORT in r.stderr for r in results]
        if any(aborted):
            aborts += 1
        if timed_out or any(r.returncode for r in results):
            bad.append(run)
            ends = "; ".join(f"node {i} rc {r.returncode}{' (aborted at exit)' if a else ''}: {last_line(r.stderr)}"
                             for i, (r, a) in enumerate(zip(results, aborted)))
            print(f"run {run}: {'deadline passed' if timed_out else 'failed'}: {ends}", flush=True)
    summary = {"command": command, "runs": args.runs, "bad": len(bad), "aborted_at_exit": aborts, "bad_runs": bad,
               "env": env, "machine": machine}
    print(f"{len(bad)} of {args.runs} runs ended badly, {aborts} with a rank aborted at exit (hook: "
          f"{not args.no_hook}, DDP released before destroy_process_group: {not args.keep_ddp})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
