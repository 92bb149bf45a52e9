"""How the CUDA top-k's first pass would split a real gradient's tiles into complete and incomplete,
for several quota factors (csrc/cuda/topk_plan.h, kQuotaFactor; the rule is described in
csrc/cuda/segmented_topk_kernels.cuh). Runs on the CPU, on the model's real gradients.

    python bench/topk_slot_study.py [--model resnet50] [--quotas 2 3 4]

For each fp32 fragment larger than a tile (8192 values), each tile keeps in its slot the top-digit
bins from the one holding its (quota x its share of k)-th largest magnitude up (at most cap =
8 x share + 128 values); a tile is incomplete when the fragment's top bin lies below the lowest bin it
kept, and then re-reads its data in each later launch (about 4 more reads of the tile). Reports
the share of tiles incomplete and the share of the data the slots hold, at d = 1% and 0.1%, for one
gradient and for the sum of two (an accumulated residual), with the estimated extra reads of the
data: 4 x incomplete share + slot bytes (6 per entry, written once, read once) / 4 bytes per value.
"""

from __future__ import annotations

import argparse

import torch

from deft_kernels.benchmarks import models

TILE = 8192


def study(x: torch.Tensor, sizes: list[int], density: float, quota_factor: int) -> tuple[float, float]:
    key = x.view(torch.int32) & 0x7FFFFFFF
    tiles = incomplete = kept = 0
    start = 0
    for size in sizes:
        seg = key[start:start + size]
        start += size
        if size <= TILE:
            continue
        k = max(1, int(density * size))
        share = -(-k * TILE // size)
        cap, quota = min(TILE, 8 * share + 128), min(TILE, quota_factor * share)
        top_bin = int(torch.topk(seg, k).values[-1]) >> 20
        for t0 in range(0, size, TILE):
            tile = seg[t0:t0 + TILE] >> 20
            above = torch.bincount(tile, minlength=2048).flip(0).cumsum(0).flip(0)  # values in bins >= b
            by_quota = int((above >= min(quota, tile.numel())).nonzero().max())
            by_cap = 0 if tile.numel() <= cap else int((above > cap).nonzero().max()) + 1
            lowest = max(by_quota, by_cap)
            tiles += 1
            incomplete += lowest > top_bin
            kept += int(above[lowest]) if lowest < 2048 else 0
    return incomplete / tiles, kept / x.numel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=models.names())
    p.add_argument("--quotas", nargs="+", type=int, default=[2, 3, 4])
    args = p.parse_args(argv)
    module, loss_fn = models.build(args.model)
    grads, layout = models.real_gradients(module, loss_fn, count=2, train_steps=2)
    sizes = [n for _, n in layout]
    print(f"{args.model}: {len(sizes)} tensors, {sum(sizes):,} values")
    print(f"{'vector':<12} {'d':>6} {'quota':>5} {'incomplete':>10} {'in slots':>9} {'extra reads':>11}")
    for label, x in (("gradient", grads[0].float()), ("sum of two", (grads[0] + grads[1]).float())):
        for density in (0.01, 0.001):
            for q in args.quotas:
                inc, kept = study(x, sizes, density, q)
                print(f"{label:<12} {density:>6.1%} {q:>5} {inc:>10.2%} {kept:>9.2%} {4 * inc + kept * 12 / 4:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
