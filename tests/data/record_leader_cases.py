"""Records what DEFT's step selects, case by case, into tests/data/leader_cases.pt: the golden cases
that tests/test_plan_protocols.py holds ``DEFT(plan="leader")`` to, so that the paper's protocol stays
selection-for-selection what the step selected before the plan one step ahead was added.

The file was written by this script at commit 2b5df5b (the step before the change), with
``python tests/data/record_leader_cases.py``. Every input is made from a seed, so the test rebuilds
it; the file holds only the outputs: per case and step, the plan (k per fragment, the bins, the
common part) and per rank the selection and the global index set, the output's values there and the
residual's checksum (sha256 of its bytes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CASES = [
    # name, sizes, n, density, dtype, steps, used pattern ("all", or which rank leaves which tensor out)
    ("mixed", [300, 40, 500, 7, 1, 2048], 3, 0.05, "float32", 4, "all"),
    ("one_rank", [1000, 10, 3], 1, 0.1, "float32", 3, "all"),
    ("ties_zeros", [256, 64, 0, 128], 4, 0.1, "float32", 4, "all"),
    ("bf16", [700, 90, 33], 2, 0.02, "bfloat16", 3, "all"),
    ("fp16_rot", [512, 512, 17], 4, 0.03, "float16", 4, "all"),
    ("unused", [300, 40, 500, 7], 3, 0.2, "float32", 4, "unused"),
    ("dense_d1", [50, 20], 2, 1.0, "float32", 2, "all"),
]


def grad(case_seed: int, rank: int, step: int, numel: int, dtype: torch.dtype, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(case_seed * 100_003 + rank * 1009 + step)
    x = torch.randn(numel, generator=g)
    if ties:  # repeated magnitudes and exact zeros
        x = (x * 4).round() / 4
        x[torch.rand(numel, generator=g) < 0.2] = 0
    return x.to(dtype)


def used_flags(pattern: str, rank: int, step: int, tensors: int) -> torch.Tensor | None:
    if pattern == "all":
        return None
    flags = torch.ones(tensors, dtype=torch.bool)
    flags[2] = False  # no rank uses tensor 2
    if rank == 1 and step % 2:
        flags[0] = False  # rank 1 leaves tensor 0 out on odd steps (others use it)
    return flags


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes: bit-exact equality without storing the tensor."""
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def run_case(case, make_sparsifier, rotation: int):
    """Runs a case in lockstep; returns per step the plan and per rank what it selected and sent."""
    from deft_kernels import driver

    name, sizes, n, density, dtype, steps, pattern = case
    dtype = getattr(torch, dtype)
    ranks = [make_sparsifier(density) for _ in range(n)]
    for sp in ranks:
        sp.rotation = rotation
    seed = sum(map(ord, name))
    out = []
    for step in range(steps):
        programs = [driver.step_program(sp, grad(seed, r, step, sum(sizes), dtype, name == "ties_zeros"),
                                        sizes=sizes, rank=r, world_size=n,
                                        used=used_flags(pattern, r, step, len(sizes)))
                    for r, sp in enumerate(ranks)]
        results = driver.run_lockstep(programs)
        plan = results[0].plan
        out.append({
            "k": plan.k.clone(), "bins": [b.clone() for b in plan.bins], "common": plan.common.clone(),
            "selected": [r.selected.clone() for r in results], "sent": [r.sent.clone() for r in results],
            "values": [r.out[r.sent].float().clone() for r in results],  # zero elsewhere
            "residual": [digest(sp.residual) for sp in ranks],
        })
    return out


def main() -> int:
    from deft_kernels.sparsifiers import build

    target = Path(__file__).with_name("leader_cases.pt")
    recorded = {f"{case[0]}/rot{rotation}": run_case(case, lambda d: build("deft", d), rotation)
                for case in CASES for rotation in (0, 1)}
    torch.save({"cases": CASES, "recorded": recorded}, target)
    print(f"wrote {target} ({target.stat().st_size} bytes, {len(recorded)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
