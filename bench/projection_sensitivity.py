"""Which assumption does the projection's answer rest on? The headline figures of deft-bench project
(DEFT against all-reduce at n = 1,024; DEFT's break-even line rate at n = 64 and 1,024, for both
plan protocols) with the model as it is, then with each assumption turned off alone, then with all
of them off (the model before issue 25: flat 10 us per step, the cheaper of tree and chain for a
broadcast, ring-only all-gather, an underated tree, every method overlapped, no tail), and with the
bus efficiency falling with the node count as nccl-tests#169 measured on RoCE.

    python bench/projection_sensitivity.py [--out deft-bench-results] [--cache-dir DIR]

The scenarios are BENCHMARKS.md's: ResNet-50 on the ImageNet layout with a V100's 213 ms step at
25 Gb/s, GPT-2 small with an A100's 284 ms step at 100 Gb/s, selection free (--selection-scale 0),
backward 2/3 of the step. The profiles are deft-bench project's (cached; measured on the first
run). Writes projection_sensitivity.{txt,json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from deft_kernels.benchmarks import DEFAULT_OUT

SCENARIOS = {
    "ResNet-50, V100, 25 Gb/s": ["--model", "resnet50", "--layout", "resnet50_imagenet", "--compute-ms", "213",
                                 "--bandwidth", "25"],
    "GPT-2 small, A100, 100 Gb/s": ["--model", "gpt2", "--distinct-gradients", "4", "--sim-workers", "1", "2", "4",
                                    "--compute-ms", "284", "--bandwidth", "100"],
}
COMMON = ["--backward-fraction", "0.667", "--selection-scale", "0", "--workers", "64", "1024", "--no-plot"]
#: nccl-tests#169 (RoCE, 8 x 100 Gb/s per node, all_reduce_perf 1-8 GB): about 100 GB/s on 2 nodes (a
#: 2-node tree can exceed the NICs, the maintainers note there), 70 on 3, 58 on 4-5, 40 on 6 nodes.
FALLING_EFFICIENCY = ["1:0.96", "3:0.70", "4:0.58", "6:0.40"]


def variants() -> list[tuple[str, list[str]]]:
    from deft_kernels.benchmarks import project

    out = [("the model (every assumption on)", [])]
    out += [(f"without {name}", ["--without", name]) for name in project.ASSUMPTIONS]
    out.append(("bus efficiency falling with nodes (nccl-tests#169)", ["--bus-efficiency", *FALLING_EFFICIENCY]))
    out.append(("all off (the model before issue 25)", ["--without", *project.ASSUMPTIONS]))
    return out


def headline(doc: dict) -> dict:
    by = {(p["workers"], p["method"]): p for p in doc["points"]}
    be = {(b["workers"], b["method"]): b for b in doc["break_even"]}
    out = {}
    for m in ("deft-ahead", "deft-leader"):
        out[m] = {"speedup_1024": by[(1024, m)]["speedup"],
                  "break_even_64": be[(64, m)]["break_even_gbps"], "verdict_64": be[(64, m)]["verdict"],
                  "break_even_1024": be[(1024, m)]["break_even_gbps"], "verdict_1024": be[(1024, m)]["verdict"]}
    return out


def _gbps(value: float | None, verdict: str) -> str:
    if value is not None:
        return f"{value:.3g}"
    return {"always faster": ">1e5", "never faster": "never"}.get(verdict, verdict)


def main(argv: list[str] | None = None) -> int:
    from deft_kernels.benchmarks import project

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="folder of the outputs (bench/results: the committed ones)")
    p.add_argument("--cache-dir", default=None, help="deft-bench project's cache (default: its own)")
    args = p.parse_args(argv)
    log = lambda msg: print(f"sensitivity: {msg}", file=sys.stderr)  # noqa: E731
    rows, start = [], time.perf_counter()
    for scenario, scenario_argv in SCENARIOS.items():
        for label, extra in variants():
            argv_ = [*scenario_argv, *COMMON, *extra] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
            pargs = project.parse_args(argv_)
            pargs.selection_source = "free"
            profile = project.build_profile(pargs, log)
            doc = project.project(pargs, profile, None)
            rows.append({"scenario": scenario, "variant": label, "argv": argv_, **headline(doc)})
    command = "python bench/projection_sensitivity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    head = ["| scenario | assumption | ahead: x all-reduce at 1,024 | ahead: pays below, Gb/s, n = 64 / 1,024 | "
            "leader: x all-reduce at 1,024 | leader: pays below, Gb/s, n = 64 / 1,024 |", "|---|---|---|---|---|---|"]
    lines = []
    for r in rows:
        a, lead = r["deft-ahead"], r["deft-leader"]
        lines.append(f"| {r['scenario']} | {r['variant']} | {a['speedup_1024']:.3f} | "
                     f"{_gbps(a['break_even_64'], a['verdict_64'])} / {_gbps(a['break_even_1024'], a['verdict_1024'])} | "
                     f"{lead['speedup_1024']:.3f} | {_gbps(lead['break_even_64'], lead['verdict_64'])} / "
                     f"{_gbps(lead['break_even_1024'], lead['verdict_1024'])} |")
    md = "\n".join(head + lines) + "\n"
    text = f"{command}\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; common options: {' '.join(COMMON)}\n\n{md}"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projection_sensitivity.txt").write_text(text)
    (out / "projection_sensitivity.md").write_text(md)
    (out / "projection_sensitivity.json").write_text(json.dumps(
        {"command": command, "common": COMMON, "scenarios": SCENARIOS, "falling_efficiency": FALLING_EFFICIENCY,
         "rows": rows, "seconds": time.perf_counter() - start}, indent=1) + "\n")
    log(f"wrote {out / 'projection_sensitivity.txt'} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
