"""What DeftState's lookup of its DDP model costs (``deft_kernels.hook.registered_on``: the garbage
collector's referrers, once per new model, at the hook's first call), in a process holding a DDP
model of the given built-in workload:

    python bench/ddp_lookup_cost.py                 # GPT-2 small (gpt2)
    python bench/ddp_lookup_cost.py --model resnet50

One process, a gloo group of one. Prints the objects the garbage collector tracks and the median
of ``--reps`` lookups (the first included; each scans the same heap).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook
from deft_kernels.benchmarks import models
from deft_kernels.benchmarks.worker_count import machine_info
from deft_kernels.hook import registered_on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", choices=models.names())
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            module, _ = models.build(args.model)
            ddp = DDP(module)
            state = DeftState()
            ddp.register_comm_hook(state, deft_hook)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                found = registered_on(state)
                times.append(time.perf_counter() - start)
            if found is not ddp:
                print("ddp_lookup_cost: the lookup did not find the DDP model", file=sys.stderr)
                return 1
            objects = len(gc.get_objects())
            machine = machine_info("cpu")
            print(f"# python bench/ddp_lookup_cost.py --model {args.model} --reps {args.reps}\n"
                  f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine['cpu_model']} "
                  f"({machine['cpus_usable']} CPUs), torch {machine['torch']}")
            print(f"{args.model}: {sum(p.numel() for p in module.parameters()):,} parameters, {objects:,} objects "
                  f"tracked; lookup median {statistics.median(times) * 1e3:.1f} ms "
                  f"(first {times[0] * 1e3:.1f} ms, {args.reps} lookups)")
            del ddp, state
            gc.collect()
        finally:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
