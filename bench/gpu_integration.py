"""The integrations on CUDA tensors, end to end: the DDP hook (``DeftState`` + ``deft_hook``) and the
plain API (``GradientSparsifier``), with 2 gloo ranks sharing the one GPU and with 1 NCCL rank.

    python bench/gpu_integration.py [--json OUT.json] [--steps 40] [--sparsifiers deft topk]

Each case trains a small MLP (its larger layers span several tiles of the CUDA top-k) on a synthetic
classification task in fresh processes, each rank its own batches, after 5 dense warm-up steps,
and checks that every rank ends with the same parameters bit for bit (sha256 of their bytes), that
the loss fell (mean of the last 5 steps below the mean of the first 5), and what density was sent.
Prints one line per case and writes them as JSON; exits 1 if a case failed. Uses only the public
API; needs a CUDA device.

STATUS: written on a machine without a GPU; not run yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

WARMUP = 5


def _train(rank: int, world_size: int, port: int, backend: str, api: str, sparsifier: str, steps: int,
           out_dir: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import deft_kernels

    result = {"rank": rank}
    try:
        torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        torch.manual_seed(0)  # the same initial model on every rank
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)).cuda()
        teacher = torch.randn(64, 4, device="cuda")
        data = torch.Generator(device="cuda").manual_seed(1 + rank)  # each rank its own batches
        sparse = None
        if api == "ddp":
            model = DDP(model)
            state = deft_kernels.DeftState(sparsifier=sparsifier, density=0.01, warmup_steps=WARMUP)
            model.register_comm_hook(state, deft_kernels.deft_hook)
        else:
            sparse = deft_kernels.GradientSparsifier(model, sparsifier=sparsifier, density=0.01, warmup_steps=WARMUP)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(steps):
            x = torch.randn(256, 64, device="cuda", generator=data)
            y = (x @ teacher).argmax(dim=1)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if sparse is not None:
                sparse.step()
            optimizer.step()
            losses.append(loss.item())
        params = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
        stats = state.compression_stats() if api == "ddp" else sparse.compression_stats()
        result.update(losses=losses, params_sha256=hashlib.sha256(params.numpy().tobytes()).hexdigest(),
                      density=stats.get("density"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # reported by the parent, which compares the ranks
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(backend: str, world_size: int, api: str, sparsifier: str, steps: int, timeout_s: float) -> dict:
    import torch.multiprocessing as mp

    case = {"backend": backend, "ranks": world_size, "api": api, "sparsifier": sparsifier, "steps": steps}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_train, args=(world_size, _free_port(), backend, api, sparsifier, steps, out_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    case.update(ok=False, error=f"timed out after {timeout_s:.0f} s")
                    return case
        except Exception as e:  # a rank died
            case.update(ok=False, error=str(e))
            return case
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
    case["seconds"] = round(time.perf_counter() - start, 1)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        case.update(ok=False, error=errors[0])
        return case
    losses = results[0]["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    agree = len({r["params_sha256"] for r in results}) == 1
    case.update(first_loss=first, last_loss=last, loss_fell=last < first, ranks_agree=agree,
                density=results[0]["density"], ok=agree and last < first)
    return case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the cases' results here")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sparsifiers", nargs="+", default=["deft"])
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per case")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_integration.py needs a CUDA device: nothing was run.", file=sys.stderr)
        return 2
    cases = []
    for sparsifier in args.sparsifiers:
        for backend, ranks in (("gloo", 2), ("nccl", 1)):
            for api in ("ddp", "plain"):
                case = run_case(backend, ranks, api, sparsifier, args.steps, args.timeout)
                cases.append(case)
                summary = (f"loss {case['first_loss']:.4f} -> {case['last_loss']:.4f}, ranks agree: "
                           f"{case['ranks_agree']}, density {case['density']}" if "first_loss" in case
                           else " ".join(case.get("error", "").strip().splitlines()[-1:]))
                status = "OK  " if case["ok"] else "FAIL"
                print(f"{status} {sparsifier} {api} {backend} x{ranks}: {summary}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "cases": cases}, indent=1))
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
