"""Host-side planning against hand-worked cases and the rules of docs/algorithm.md (steps 2-6)."""

import math
from itertools import accumulate

import pytest
import torch

from deft_kernels import planning, reference
from deft_kernels.benchmarks import layouts
from deft_kernels.sparsifiers import DEFT


def test_fragments_cut_only_tensors_larger_than_n_th_of_the_total():
    # N = 20, n = 2: 11 > 10 is cut into 6 + 5; 5 and 4 stay whole.
    assert planning.fragment_sizes([11, 5, 4], 2) == [6, 5, 5, 4]
    # n = 3: threshold 20/3; 11 -> 4,4,3; 5 and 4 stay.
    assert planning.fragment_sizes([11, 5, 4], 3) == [4, 4, 3, 5, 4]
    assert planning.fragment_sizes([10, 10], 2) == [10, 10]  # exactly N/n is not "more than"
    assert planning.fragment_sizes([7], 1) == [7]
    assert planning.fragment_offsets([11, 5, 4], 2).tolist() == [0, 6, 11, 16, 20]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32])
def test_fragments_of_resnet50_cover_the_vector_and_differ_by_at_most_one(n):
    sizes = [s for _, s in layouts.resnet50_layout()]
    frag = planning.fragment_sizes(sizes, n)
    assert sum(frag) == sum(sizes)
    pos = 0
    for s in sizes:  # each tensor's fragments are contiguous and nearly equal
        parts = [s] if s * n <= sum(sizes) or n == 1 else frag[pos:pos + n]
        assert sum(parts) == s and max(parts) - min(parts) <= 1
        pos += len(parts)
    assert pos == len(frag)


def test_local_k_hand_worked():
    # k = 10, norms 4, 3, 1 (sum 8), sizes 100 each:
    # f0: int(10*4/8)=5; left 5 and 4. f1: int(5*3/4)=3; left 2 and 1. f2: int(2*1/1)=2.
    k = planning.local_k(torch.tensor([4.0, 3.0, 1.0]), torch.tensor([100, 100, 100]), 10)
    assert k.tolist() == [5, 3, 2]
    # Clamps: a share above the size becomes the size; a zero share becomes 1.
    k = planning.local_k(torch.tensor([1.0, 9.0, 0.0]), torch.tensor([50, 3, 50]), 20)
    # f1 (norm 9): int(20*9/10)=18 > 3 -> 3; left 17, 1. f0: int(17*1/1)=17; left 0, 0. f2: 0 -> max(1, 0) = 1.
    assert k.tolist() == [17, 3, 1]
    # Equal norms: lower fragment id first. k = 5 over 3 equal: int(5/3)=1, int(4/2)=2, int(2/1)=2.
    assert planning.local_k(torch.ones(3), torch.tensor([9, 9, 9]), 5).tolist() == [1, 2, 2]


def test_local_k_sends_non_finite_fragments_whole():
    k = planning.local_k(torch.tensor([1.0, float("nan"), float("inf"), 1.0]), torch.tensor([10, 4, 3, 10]), 9)
    assert k.tolist() == [1, 4, 3, 1]  # 9 - 7 = 2 left for the finite ones: int(2/2)=1, int(1/1)=1


def test_local_k_sums_to_the_budget_when_the_clamps_allow(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1000, 5000, (50,), generator=gen)
    norms = torch.rand(50, generator=gen) + 0.1
    k = planning.local_k(norms, sizes, 2000)
    assert int(k.sum()) == 2000 and bool((k >= 1).all()) and bool((k <= sizes).all())


def test_local_k_tops_up_what_the_floors_leave():
    # Rounding: f0 int(27 * 16/22) = 19, f1 int(8 * 5/6) = 6, f2 int(2 * 1/1) rounds to 1 (the running
    # norm is a hair above 1/7); the unassigned 1 goes to f0, the first in visiting order with room.
    assert planning.local_k(torch.tensor([16.0, 5.0, 1.0], dtype=torch.float64) / 7, torch.tensor([100] * 3),
                            27).tolist() == [20, 6, 1]
    # Clamps: f0, f1 are whole at 1; f2 has norm 0 (share 0, floor 1); the 2 left go to f2.
    assert planning.local_k(torch.tensor([10.0, 10.0, 0.0]), torch.tensor([1, 1, 100]), 5).tolist() == [1, 1, 3]
    # The whole vector with zero-norm fragments: every fragment is whole (d = 1 sends everything).
    assert planning.local_k(torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([10, 10, 10, 0]), 30).tolist() == [
        10, 10, 10, 0]


def test_local_k_never_shares_out_more_than_is_left():
    # The running norm sum 1e20 + 21000 rounds to 1e20 + 16384: f2's ratio 7000 / 2384 is above 1.
    # Uncapped it would take int(9 * 7000 / 2384) = 26 of the 9 left; capped it takes 9.
    norms = torch.tensor([7000.0, 7000.0, 7000.0, 1e20], dtype=torch.float64)
    assert planning.local_k(norms, torch.tensor([100, 100, 100, 1]), 60).tolist() == [25, 25, 9, 1]


def test_local_k_floor_past_the_budget_is_the_only_excess():
    # k = 3 over 10 equal norms: three fragments use it up, the seven after get their floor of 1.
    assert planning.local_k(torch.ones(10), torch.full((10,), 5), 3).tolist() == [1] * 10


def _check_sent_count_bound(norms: torch.Tensor, sizes: torch.Tensor, budget: int, k: torch.Tensor) -> None:
    """The bound of docs/algorithm.md ("How many DEFT sends"), from the output alone."""
    norm, size, kk = norms.double().tolist(), sizes.tolist(), k.tolist()
    finite = [math.isfinite(v) for v in norm]
    whole = sum(s for s, ok in zip(size, finite) if not ok)
    total, numel = sum(kk), sum(size)
    assert all(0 <= kk[f] <= size[f] for f in range(len(size)))
    assert all(kk[f] == size[f] for f in range(len(size)) if not finite[f])  # non-finite: sent whole
    assert all(kk[f] >= 1 for f in range(len(size)) if size[f] > 0)  # the floor
    order = sorted((f for f in range(len(norm)) if finite[f]), key=lambda f: (-norm[f], f))
    if whole > budget:  # the non-finite fragments took it all: every other fragment gets its floor
        assert all(kk[f] == min(1, size[f]) for f in order)
        return
    if budget >= numel:
        assert kk == size  # the whole vector: every fragment whole
    if total <= min(budget, numel):
        assert total == min(budget, numel)  # the top-up hands out all of it
        return
    # Excess: some prefix of the visiting order used the budget up exactly, and each non-empty
    # fragment after it has its floor of 1, one element each, the whole excess.
    prefix = list(accumulate((kk[f] for f in order), initial=whole))
    assert budget in prefix, "no prefix of the visiting order uses the budget up exactly"
    after = [f for f in order[prefix.index(budget):] if size[f] > 0]
    assert all(kk[f] == 1 for f in after) and total - budget == len(after)
    if budget > whole:  # the first fragment visited takes a share of a non-zero budget
        assert len(after) <= sum(1 for f in order if size[f] > 0) - 1


@pytest.mark.parametrize("case", ["random", "tiny", "huge", "ties", "non_finite", "zeros", "fp32"])
def test_local_k_sent_count_bound_on_random_layouts(seed, case):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        norms, sizes, budget = _random_plan_inputs(gen, case)
        _check_sent_count_bound(norms, sizes, budget, planning.local_k(norms, sizes, budget))
        total = int(sizes.sum())  # d = 1, zero norms included: everything
        _check_sent_count_bound(norms, sizes, total, planning.local_k(norms, sizes, total))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_deft_at_density_one_sends_everything_with_zero_norm_fragments(seed, n):
    gen = torch.Generator().manual_seed(seed)
    sizes = [3000, 10, 500, 2, 8000, 40, 7]
    acc = torch.randn(sum(sizes), generator=gen)
    acc[3000:3010] = 0  # a zero-norm fragment
    acc[-7:] = 0
    d = DEFT(1.0)
    offsets = d.fragment_offsets(sizes, n)
    norms = torch.stack([acc[lo:hi].norm() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    plan = d.plan(acc, norms, offsets, n, 0)
    assert torch.equal(plan.k, plan.sizes) and plan.sent_count == sum(sizes)
    assert torch.equal(d.always_sent(plan, acc.device), torch.arange(sum(sizes)))


def test_lpt_hand_worked():
    # costs 7 5 4 3 3 into 2 bins: 7->b0, 5->b1, 4->b1 (9), 3->b0 (10), 3->b1 (12)
    bins = planning.pack_bins(torch.tensor([3.0, 7.0, 4.0, 5.0, 3.0]), 2, torch.arange(5))
    assert [b.tolist() for b in bins] == [[0, 1], [2, 3, 4]]
    assert planning.imbalance([10, 12]) == pytest.approx(12 / 11)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("cost_model", sorted(planning.COST_MODELS))
def test_plan_rules(seed, n, cost_model):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.cat([torch.randint(1, 20, (40,), generator=gen), torch.randint(1000, 100000, (60,), generator=gen)])
    norms = torch.rand(100, generator=gen)
    plan = planning.make_plan(norms, sizes, int(0.01 * int(sizes.sum())), n, cost_model)
    assert len(plan.bins) == n
    binned = torch.cat(plan.bins).tolist()
    assert len(binned) == len(set(binned))  # bins disjoint
    selectable = {f for f in range(100) if 0 < plan.k[f] < sizes[f]}
    assert set(binned) == selectable  # every non-common fragment in exactly one bin
    assert set(plan.common.tolist()) == {f for f in range(100) if plan.k[f] == sizes[f]}
    common = plan.common_indices()
    assert common.numel() == int(sizes[plan.common].sum()) and common.unique().numel() == common.numel()


@pytest.mark.parametrize("n", [1, 3, 8])
def test_rotation_visits_every_bin_in_n_steps(n):
    for rank in range(n):
        assert sorted(planning.bin_of(rank, t, n) for t in range(n)) == list(range(n))
    for t in range(n):  # and at each step the workers hold distinct bins
        assert sorted(planning.bin_of(r, t, n) for r in range(n)) == list(range(n))


def test_plan_rotation_helpers_hand_worked():
    # sizes 100 each, k = 12 by norms 8, 4, 2, 2 -> k = 6, 3, 1, 2 (f2 then f3: int(3*2/4)=1, int(2*2/2)=2).
    plan = planning.make_plan(torch.tensor([8.0, 4.0, 2.0, 2.0]), torch.tensor([100] * 4), 12, 2, "size")
    assert plan.k.tolist() == [6, 3, 1, 2] and plan.world_size == 2
    # equal costs (size): LPT by id, f0->b0, f1->b1, f2->b0, f3->b1
    assert [b.tolist() for b in plan.bins] == [[0, 2], [1, 3]]
    assert plan.bin_of(0, 0) == 0 and plan.bin_of(1, 0) == 1 and plan.bin_of(0, 1) == 1 and plan.bin_of(1, 3) == 0
    assert plan.fragments_of(0, 1).tolist() == [1, 3] and plan.fragments_of(1, 1).tolist() == [0, 2]
    with pytest.raises(ValueError, match="rank must lie in"):
        plan.bin_of(2, 0)
    with pytest.raises(ValueError, match="step must be non-negative"):
        plan.fragments_of(0, -1)


@pytest.mark.parametrize("n", [2, 5])
def test_deft_phases_simulated_ranks_send_exactly_sum_k_without_duplicates(seed, n):
    gen = torch.Generator().manual_seed(seed)
    sizes = [3000, 10, 500, 2, 8000, 40]
    acc = torch.randn(sum(sizes), generator=gen)
    d = DEFT(0.02)
    offsets = d.fragment_offsets(sizes, n)
    norms = torch.stack([acc[lo:hi].norm() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    for step in range(n):
        plan = d.plan(acc, norms, offsets, n, step)
        picked = [d.select(acc, norms, offsets, plan, r, n, step) for r in range(n)]
        common = d.always_sent(plan, acc.device)
        allidx = torch.cat(picked + ([common] if common is not None else []))
        assert allidx.unique().numel() == allidx.numel() == int(plan.k.sum())


@pytest.mark.parametrize("match, call", [
    ("world_size must be a positive int", lambda: planning.fragment_sizes([4], 0)),
    ("sizes must be non-negative", lambda: planning.fragment_sizes([4, -1], 2)),
    ("sizes must be a sequence of ints", lambda: planning.fragment_sizes(["a"], 2)),
    ("norms must be a 1-D float", lambda: planning.local_k(torch.tensor([1, 2]), torch.tensor([1, 2]), 1)),
    ("sizes must be an int64 tensor", lambda: planning.local_k(torch.ones(2), torch.tensor([1]), 1)),
    ("k_total must be a non-negative int", lambda: planning.local_k(torch.ones(1), torch.tensor([1]), -1)),
    ("norms must be non-negative", lambda: planning.local_k(torch.tensor([1.0, -1.0]), torch.tensor([1, 2]), 1)),
    ("norms must be non-negative", lambda: planning.make_plan(torch.tensor([-1.0]), torch.tensor([4]), 1, 1)),
    ("sizes must be non-negative", lambda: planning.local_k(torch.ones(2), torch.tensor([1, -2]), 1)),
    ("k_total must be a non-negative int", lambda: planning.make_plan(torch.ones(1), torch.tensor([4]), -1, 1)),
    ("world_size must be a positive int", lambda: planning.make_plan(torch.ones(1), torch.tensor([4]), 1, 0)),
    ("cost_model must be one of", lambda: planning.make_plan(torch.ones(1), torch.tensor([4]), 1, 1, "nope")),
    ("cost_model must be one of", lambda: planning.make_plan(torch.ones(1), torch.tensor([4]), 1, 1, 3)),
    ("cost_model must be one of", lambda: DEFT(0.1, cost_model="nope")),
    ("rank must lie in", lambda: planning.bin_of(3, 0, 2)),
    ("loads must not be empty", lambda: planning.imbalance([])),
    ("sizes must be a 1-D int64 tensor", lambda: planning.cost_size_log_k(torch.ones(2), torch.ones(2, dtype=torch.int64))),
    ("k must be an int64 tensor shaped like sizes", lambda: planning.cost_size(torch.tensor([4, 4]), torch.tensor([1]))),
    ("k must be an int64 tensor shaped like sizes",
     lambda: planning.common_fragments(torch.tensor([1.0]), torch.tensor([4]))),
    ("costs must be a 1-D real tensor", lambda: planning.pack_bins([1.0, 2.0], 2, torch.arange(2))),
    ("costs must be finite", lambda: planning.pack_bins(torch.tensor([1.0, float("nan")]), 2, torch.arange(2))),
    ("costs must be finite", lambda: planning.pack_bins(torch.tensor([float("inf"), 1.0]), 2, torch.arange(1))),
    ("candidates must be a 1-D int64 tensor", lambda: planning.pack_bins(torch.ones(2), 2, [0, 1])),
    ("candidates must be distinct fragment ids in \\[0, 2\\)",
     lambda: planning.pack_bins(torch.ones(2), 2, torch.tensor([0, 2]))),
    ("candidates must be distinct", lambda: planning.pack_bins(torch.ones(2), 2, torch.tensor([1, 1]))),
    ("sizes must be a 1-D integer tensor", lambda: planning.make_plan(torch.ones(1), [4], 1, 1)),
    ("cost_model must return a real tensor shaped like sizes",
     lambda: planning.make_plan(torch.ones(2), torch.tensor([4, 4]), 2, 1, lambda s, k: s[:1].double())),
])
def test_bad_input_names_the_argument(match, call):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def _random_plan_inputs(gen: torch.Generator, case: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Norms, sizes and a budget for the C++-vs-reference checks: every kind of layout the planner
    meets, with ties, zeros, empty fragments, non-finite norms and budgets from 0 past N."""
    num = int(torch.randint(1, 600, (1,), generator=gen))
    sizes = torch.randint(0, 5000, (num,), generator=gen)
    if case == "tiny":
        sizes = torch.randint(0, 4, (num,), generator=gen)
    elif case == "huge":
        sizes[int(torch.randint(0, num, (1,), generator=gen))] = 10_000_000
    norms = torch.rand(num, generator=gen, dtype=torch.float64) * sizes.double().sqrt()
    if case == "ties":
        norms = torch.randint(0, 3, (num,), generator=gen).double()  # many equal norms, zeros
        sizes = torch.full((num,), int(torch.randint(1, 50, (1,), generator=gen)))
    elif case == "non_finite":
        norms[torch.randint(0, num, (3,), generator=gen)] = float("nan")
        norms[torch.randint(0, num, (2,), generator=gen)] = float("inf")
    elif case == "zeros":
        norms[torch.rand(num, generator=gen) < 0.5] = 0.0
    total = int(sizes.sum())
    budgets = [0, 1, num // 2, max(1, total // 100), total // 3, total, total + 7]
    budget = budgets[int(torch.randint(0, len(budgets), (1,), generator=gen))]
    return norms.float() if case == "fp32" else norms, sizes, budget


CASES = ["random", "tiny", "huge", "ties", "non_finite", "zeros", "fp32"]


@pytest.mark.parametrize("case", CASES)
def test_local_k_in_cpp_equals_the_python_reference(seed, case):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        norms, sizes, budget = _random_plan_inputs(gen, case)
        assert torch.equal(planning.local_k(norms, sizes, budget), reference.local_k(norms, sizes, budget))


@pytest.mark.parametrize("n", [1, 2, 3, 16, 64])
def test_pack_bins_in_cpp_equals_the_python_reference(seed, n):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(20):
        num = int(torch.randint(0, 500, (1,), generator=gen))
        costs = torch.randn(num, generator=gen, dtype=torch.float64) * 100  # negative costs too
        if trial % 2:
            costs = torch.randint(0, 4, (num,), generator=gen).double()  # heavy ties
        candidates = torch.randperm(num, generator=gen)[: int(torch.randint(0, num + 1, (1,), generator=gen))]
        got = planning.pack_bins(costs, n, candidates)
        want = reference.pack_bins(costs, n, candidates)
        assert [b.tolist() for b in got] == [b.tolist() for b in want]


@pytest.mark.parametrize("n", [1, 2, 5, 32])
@pytest.mark.parametrize("cost_model", sorted(planning.COST_MODELS))
@pytest.mark.parametrize("case", CASES)
def test_make_plan_in_one_cpp_call_equals_the_reference_rules(seed, n, cost_model, case):
    """A named cost model makes the whole plan in C++; it must equal the plan built step by step
    from the plain-Python references and the torch cost models."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        norms, sizes, budget = _random_plan_inputs(gen, case)
        plan = planning.make_plan(norms, sizes, budget, n, cost_model)
        k = reference.local_k(norms, sizes, budget)
        assert torch.equal(plan.k, k)
        assert torch.equal(plan.common, planning.common_fragments(k, sizes))
        # std::log2 in C++, torch.log2 here: equal to within an ulp
        torch.testing.assert_close(plan.costs, planning.COST_MODELS[cost_model](sizes, k), rtol=4e-16, atol=0)
        selectable = torch.nonzero((k > 0) & (k < sizes)).flatten()
        want = reference.pack_bins(plan.costs, n, selectable)
        assert [b.tolist() for b in plan.bins] == [b.tolist() for b in want]
        assert plan.sent_count == int(k.sum())
        # the callable path (local_k, the model, pack_bins) gives the same plan
        by_callable = planning.make_plan(norms, sizes, budget, n, planning.COST_MODELS[cost_model])
        assert torch.equal(by_callable.k, plan.k) and torch.equal(by_callable.common, plan.common)
        if cost_model == "size":
            assert [b.tolist() for b in by_callable.bins] == [b.tolist() for b in plan.bins]
