"""Bytes per parameter of a sparsifier and of its step, per gradient dtype (issue 23, item 9):

    python bench/memory.py [--layout resnet50|gpt2|synthetic] [--numel N --tensors T]
                           [--sparsifiers deft topk cltk dense] [--dtypes float32 bfloat16 float16]
                           [--density 0.01] [--steps 3] [--world-size 1] [--loss-scale S]
                           [--device cpu|cuda] [--out bench/results/memory_<device>.json]

For each sparsifier and gradient dtype it runs ``--steps`` steps of the driver on a flat gradient of
the layout (the call the DDP hook makes: ``driver.step_program`` with ``out=grad``, the result
written into the gradient's own buffer), then measures:

- **kept between steps**: every tensor the sparsifier holds after those steps (its attributes, and
  lists, tuples, dicts and deft_kernels objects among them; host and device tensors alike), each
  storage counted once, by attribute (the residual, the spare work buffer, the fragment offsets, ...);
- **step peak**: one more step's peak of memory allocated above what existed when it began (its
  temporaries, the exchange's buffers, anything it keeps), and what of that is still held when it
  ends. On CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the start. On CPU: the allocation stream that ``torch.profiler`` records
  with ``profile_memory=True`` (the profiler's CPU memory reporter sees every allocation and free
  made through torch's CPU allocator, in order); the peak of its running sum. Not seen on CPU:
  memory the C++ kernels take outside torch's allocator (std::vector scratch: per-thread partial
  norms, O(threads x fragments); top-k candidates of a fragment, usually a small fraction of it),
  gloo's internal buffers, Python objects.

The gradient itself (the model's) is not counted. ``--world-size n > 1`` runs n gloo ranks on this
machine (CPU only) and reports rank 0; a world of one has no peers (its all-gather holds one rank's
selection). Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deft_kernels import driver, sparsifiers
from deft_kernels.benchmarks import layouts
from deft_kernels.benchmarks.worker_count import machine_info

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = {"resnet50": layouts.resnet50_layout, "gpt2": layouts.gpt2_small_layout}
# The hard threshold needs its threshold=, which sets its density: not among the choices.
SPARSIFIERS = [name for name in sparsifiers.SPARSIFIERS if name != "threshold"]


def layout_sizes(args) -> list[int]:
    if args.layout == "synthetic":
        base, extra = divmod(args.numel, args.tensors)
        return [base + (i < extra) for i in range(args.tensors)]
    return [size for _, size in LAYOUTS[args.layout]()]


# ---------------------------------------------------------------------------------------------
# What is held, and what a call allocates


def held_bytes(obj) -> dict[str, int]:
    """Bytes of the tensors reachable from ``obj``'s attributes (through lists, tuples, dicts and
    objects of deft_kernels' classes), by top-level attribute; a storage shared by several tensors
    is counted once, under the first attribute that reaches it."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}

    def visit(top: str, value, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                out[top] = out.get(top, 0) + storage.nbytes()
            return
        if depth > 4:
            return
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        elif type(value).__module__.startswith("deft_kernels") and hasattr(value, "__dict__"):
            children = vars(value).values()
        else:
            return
        for child in children:
            visit(top, child, depth + 1)

    for name, value in vars(obj).items():
        visit(name, value, 0)
    return {name: b for name, b in out.items() if b}


def cpu_allocations(fn) -> tuple[object, int, int]:
    """Runs ``fn()`` under torch.profiler with ``profile_memory=True``; returns its result, the peak
    of the bytes allocated through torch's CPU allocator during the call and not yet freed (above the
    start), and those still held at its end."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    held = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        held += size
        peak = max(peak, held)
    return result, peak, held


def cuda_allocations(fn) -> tuple[object, int, int]:
    """:func:`cpu_allocations` on the current CUDA device, by the caching allocator's statistics."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start


# ---------------------------------------------------------------------------------------------
# The measurement


def hook_step(sp, grad: torch.Tensor, sizes: list[int], world_size: int, loss_scale: float | None):
    """One driver step as the DDP hook runs it (the result written into ``grad``), on the default
    group when there is one, else in a world of one."""
    rank = dist.get_rank() if world_size > 1 else 0
    program = driver.step_program(sp, grad, sizes=sizes, rank=rank, world_size=world_size, out=grad,
                                  loss_scale=loss_scale)
    if world_size > 1:
        result = driver.run_blocking(program, driver.TorchCollectives(None))
    else:
        result = driver.run_lockstep([program])[0]
    if loss_scale is not None:  # the hook commits a loss-scaled iteration at its end
        driver.commit([(sp, result)])
    return result


def measure(name: str, dtype: torch.dtype, sizes: list[int], args, rank: int = 0) -> dict:
    device = torch.device(args.device)
    numel = sum(sizes)
    gen = torch.Generator().manual_seed(1000 * rank + 7)
    grad = torch.empty(numel, dtype=dtype, device=device)
    sp = sparsifiers.build(name, args.density)
    allocations = cuda_allocations if device.type == "cuda" else cpu_allocations
    for s in range(args.steps + 1):
        grad.copy_(torch.randn(numel, generator=gen))  # a fresh gradient each step (not measured)
        if s < args.steps:
            hook_step(sp, grad, sizes, args.world_size, args.loss_scale)
        else:
            _, peak, kept = allocations(lambda: hook_step(sp, grad, sizes, args.world_size, args.loss_scale))
    held = held_bytes(sp)
    residual = getattr(sp, "residual", None)
    return {"sparsifier": name, "grad_dtype": str(dtype).removeprefix("torch."),
            "residual_dtype": None if residual is None else str(residual.dtype).removeprefix("torch."),
            "kept_between_steps_bytes": held, "kept_between_steps_per_param": sum(held.values()) / numel,
            "step_peak_bytes": peak, "step_peak_per_param": peak / numel,
            "held_after_step_bytes": kept, "held_after_step_per_param": kept / numel}


def measure_all(sizes: list[int], args, rank: int = 0) -> list[dict]:
    return [measure(name, DTYPES[d], sizes, args, rank) for name in args.sparsifiers for d in args.dtypes]


def _rank_main(rank: int, args, sizes: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=args.world_size, timeout=timedelta(seconds=args.timeout))
    try:
        rows = measure_all(sizes, args, rank)
        if rank == 0:
            Path(out_dir, "rows.json").write_text(json.dumps(rows))
        # End cleanly (docs/operations.md, step 6): every rank done with gloo, its work released, then
        # the group destroyed; a CI run aborted a rank here now and then without it.
        dist.barrier()
        del rows
        gc.collect()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the result is written: skip the interpreter's shutdown, which now and then aborted a rank


def measure_ranks(sizes: list[int], args) -> list[dict]:
    """:func:`measure_all` on rank 0 of ``args.world_size`` gloo ranks, each a process of its own;
    every rank is killed past ``args.timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank_main, args=(args, sizes, tmp), nprocs=args.world_size, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{args.world_size} ranks still running after {args.timeout} s: killed")
        return json.loads(Path(tmp, "rows.json").read_text())


# ---------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[dict], numel: int) -> str:
    """One line per row, bytes per parameter; the attributes kept between steps that hold at least
    0.005 B/param each are listed."""
    lines = [f"{'sparsifier':<10} {'grad':<9} {'residual':<9} {'kept between steps, B/param':<40} "
             f"{'step peak':>9} {'total':>6} {'held after':>10}"]
    for r in rows:
        parts = ", ".join(f"{k} {b / numel:.2f}" for k, b in r["kept_between_steps_bytes"].items()
                          if b / numel >= 0.005)
        kept = f"{r['kept_between_steps_per_param']:.2f}" + (f" ({parts})" if parts else "")
        lines.append(f"{r['sparsifier']:<10} {r['grad_dtype']:<9} {r['residual_dtype'] or '-':<9} {kept:<40} "
                     f"{r['step_peak_per_param']:>9.2f} "
                     f"{r['kept_between_steps_per_param'] + r['step_peak_per_param']:>6.2f} "
                     f"{r['held_after_step_per_param']:>10.2f}")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="resnet50", choices=[*LAYOUTS, "synthetic"])
    p.add_argument("--numel", type=int, default=1_000_000, help="synthetic layout: parameters")
    p.add_argument("--tensors", type=int, default=10, help="synthetic layout: tensors (near-equal sizes)")
    p.add_argument("--sparsifiers", nargs="+", default=["deft", "topk", "cltk", "dense"], choices=SPARSIFIERS)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=3, help="steps before the measured one (the first makes the state)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--loss-scale", type=float, default=None, help="the GradScaler path: grad / scale accumulated")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before --world-size ranks are killed")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/memory_<device>.json)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.world_size < 1:
        p.error(f"--world-size must be at least 1, got {args.world_size}")
    if args.world_size > 1 and args.device != "cpu":
        p.error("--world-size > 1 runs gloo ranks on this machine's CPU: use --device cpu")
    if args.layout == "synthetic" and not 1 <= args.tensors <= args.numel:
        p.error(f"--tensors must lie in [1, --numel], got {args.tensors} for {args.numel}")
    if not 0 < args.density <= 1:
        p.error(f"--density must lie in (0, 1], got {args.density}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device and torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = layout_sizes(args)
    rows = measure_ranks(sizes, args) if args.world_size > 1 else measure_all(sizes, args)
    command = "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info(args.device)
    header = (f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}, "
              f"{machine['gpu'] or machine['cpu_model']}, torch {machine['torch']}\n"
              f"{args.layout}: {sum(sizes):,} parameters in {len(sizes)} tensors, density {args.density:g}, "
              f"world size {args.world_size}, {args.device}, loss scale {args.loss_scale}; bytes per parameter "
              f"(the gradient itself not counted; total = kept between steps + step peak; held after: what the "
              f"step allocated and still holds when it returns, its result among it)")
    print(header)
    print(format_table(rows, sum(sizes)))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"memory_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "commit": git_commit(), "machine": machine,
                               "layout": args.layout, "numel": sum(sizes), "tensors": len(sizes),
                               "density": args.density, "world_size": args.world_size, "steps": args.steps,
                               "loss_scale": args.loss_scale, "device": args.device,
                               "method": "cuda caching allocator statistics" if args.device == "cuda"
                               else "torch.profiler profile_memory allocation stream", "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
