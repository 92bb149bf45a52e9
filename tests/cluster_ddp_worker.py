"""A few DDP steps with the DEFT hook, one process per node of an emulated cluster (tests/test_cluster.py
launches it with a multi-node torchrun). Prints one JSON line: this rank's stats and a parameter checksum.

bench/exit_abort.py runs it with two switches off, to measure what they are for: DEFT_WORKER_HOOK=0
(plain DDP, no comm hook) and DEFT_WORKER_RELEASE=0 (DDP left alive to interpreter shutdown)."""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deft_kernels import DeftState, deft_hook

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                            torch.nn.ReLU(), torch.nn.Linear(1024, 10))
ddp = DDP(model, bucket_cap_mb=0.25)  # the last two layers fill DDP's first bucket (1 MB), the first one a second
state = DeftState(sparsifier="deft", density=0.05, warmup_steps=1)
HOOK = os.environ.get("DEFT_WORKER_HOOK", "1") != "0"
if HOOK:
    ddp.register_comm_hook(state, deft_hook)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
gen = torch.Generator().manual_seed(rank)
for _ in range(steps):
    x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
checksum = torch.cat([p.detach().flatten() for p in model.parameters()])
# every rank must hold the same parameters: the hook's output is the same mean on every rank
gathered = [torch.empty_like(checksum) for _ in range(world)]
dist.all_gather(gathered, checksum)
print(json.dumps({"rank": rank, "world": world, "node": os.environ.get("DEFT_CLUSTER_NODE"),
                  "stats": state.compression_stats() if HOOK else None, "buckets": len(state.last_stats),
                  "same_params": all(torch.equal(g, checksum) for g in gathered)}), flush=True)
# Release DDP (whose C++ reducer holds the hook and its state) and gloo's work while the interpreter
# is whole: left to interpreter shutdown, their destruction aborted the process now and then
# ("terminate called without an active exception" after the last line above: bench/exit_abort.py).
dist.barrier()
if os.environ.get("DEFT_WORKER_RELEASE", "1") != "0":
    del ddp, opt, state, gathered
    gc.collect()
dist.destroy_process_group()
