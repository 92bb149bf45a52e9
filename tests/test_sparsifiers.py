"""Each sparsifier on one process (world size 1, no torch.distributed), the simulation's checks and
the algorithms' own rules: CLT-k, the hard threshold, SIDCo's fit, MiCRO's partitions and steering.
The shared step's error feedback and state round trip are in tests/test_sparsifier_step.py."""

import math

import pytest
import torch

from deft_kernels import driver, planning
from deft_kernels.simulate import simulate
from deft_kernels.sparsifiers import CLTK, DEFT, SPARSIFIERS, HardThreshold, MiCRO, SIDCo, TopK, build

KWARGS = {"threshold": {"threshold": 1.5}}
SIZES = [3000, 10, 500, 2, 8000, 40]


def test_registry_holds_every_algorithm_by_lower_case_name():
    assert sorted(SPARSIFIERS) == ["cltk", "deft", "dense", "micro", "sidco", "threshold", "topk"]
    assert isinstance(build("DEFT", 0.1), DEFT) and isinstance(build("MiCRO", 0.1), MiCRO)
    with pytest.raises(ValueError, match=r"name must be one of \['cltk', 'deft'"):
        build("powersgd", 0.1)


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_on_the_kernels_equals_the_simulation_on_the_reference(seed, name, dtype):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(sum(SIZES), generator=gen).to(dtype) for _ in range(4)]
    density = 1.0 if name == "dense" else 0.01
    s = build(name, density, **KWARGS.get(name, {}))
    for t, sim in enumerate(simulate(name, density, [grads], sizes=SIZES, **KWARGS.get(name, {}))):
        out, stats = driver.step(s, grads[t], sizes=SIZES)
        assert torch.equal(out, sim.outputs[0]), t
        assert stats.sent == sim.sent.numel() and stats.selected == sim.selected[0].numel()
        if name != "dense":
            assert torch.equal(s.residual, sim.residuals[0]), t
            kept = torch.ones_like(sim.accumulated[0], dtype=torch.bool)
            kept[sim.sent] = False  # conservation: a == residual + a on the sent set
            assert s.residual.dtype == torch.float32  # residual_dtype's default, for bf16 gradients too
            assert torch.equal(sim.accumulated[0], s.residual + torch.where(kept, 0, sim.accumulated[0]))


def test_simulate_takes_a_fresh_instance_and_leaves_it_untouched(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(sum(SIZES), generator=gen) for _ in range(3)] for _ in range(2)]
    mine = DEFT(0.02, cost_model="size")
    by_instance = simulate(mine, grads=grads, sizes=SIZES)
    by_name = simulate("deft", 0.02, grads, sizes=SIZES, cost_model="size")
    for a, b in zip(by_instance, by_name):
        assert torch.equal(a.sent, b.sent) and all(torch.equal(x, y) for x, y in zip(a.outputs, b.outputs))
    assert mine.residual is None and mine.step_count == 0 and mine.kernels is not simulate.__globals__["reference"]
    driver.step(mine, grads[0][0], sizes=SIZES)
    with pytest.raises(ValueError, match="sparsifier must be a fresh instance"):
        simulate(mine, grads=grads, sizes=SIZES)


def test_cltk_on_one_worker_is_top_k_and_sends_exactly_k(seed):
    g = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    a, sa = driver.step(CLTK(0.01), g)
    b, sb = driver.step(TopK(0.01), g)
    assert torch.equal(a, b) and sa.sent == 50 and sa.bytes_sent == 4 * 50  # no indices of its own


@pytest.mark.parametrize("n", [2, 3])
def test_cltk_simulated_workers_send_the_leaders_top_k(seed, n):
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(1000, generator=gen) for _ in range(n)] for _ in range(n)]
    for t, sim in enumerate(simulate("cltk", 0.02, grads)):
        assert sim.sent.numel() == 20
        leader_a = sim.accumulated[t % n]
        assert torch.equal(sim.sent, torch.sort(leader_a.abs().topk(20).indices).values)


def test_hard_threshold_sends_every_magnitude_at_or_above_it_and_nan():
    g = torch.tensor([0.5, -1.5, 2.0, 0.0, float("nan"), -0.1, 1.5])
    out, stats = driver.step(HardThreshold(1.5), g)
    assert torch.nonzero(out.isnan() | (out != 0)).flatten().tolist() == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="threshold must be a positive finite number"):
        HardThreshold(0.0)
    with pytest.raises(ValueError, match="threshold must be a positive finite number"):
        build("threshold", 0.1, threshold=float("inf"))


@pytest.mark.parametrize("first_stage", ["exponential", "gamma", "gpareto"])
@pytest.mark.parametrize("law", ["laplace", "normal", "gamma"])
@pytest.mark.parametrize("density", [0.01, 0.001])
def test_sidco_passes_about_k_elements(seed, first_stage, law, density):
    gen = torch.Generator().manual_seed(seed)
    n = 400_000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    x = {"laplace": -torch.log(u), "normal": torch.randn(n, generator=gen, dtype=torch.float64),
         "gamma": -torch.log(u) - torch.log(torch.rand(n, generator=gen, dtype=torch.float64))}[law].float()
    s = SIDCo(density, first_stage=first_stage)
    count = int((x.abs() >= s.estimate_threshold(x)).sum())
    k = density * n
    # Stage 1 misfits some laws (an exponential fit of |normal|); the exceedance stages repair most of it.
    assert 0.5 * k <= count <= 2.0 * k, (count, k)


def test_sidco_stage_count_and_degenerate_input():
    assert SIDCo(0.01).stages == 2 and SIDCo(0.001).stages == 3 and SIDCo(0.2).stages == 1
    assert SIDCo(0.01).estimate_threshold(torch.zeros(100)) == math.inf
    assert SIDCo(1.0).estimate_threshold(torch.randn(100)) == 0.0
    out, stats = driver.step(SIDCo(0.01), torch.zeros(100))
    assert stats.sent == 0 and not bool(out.any())


@pytest.mark.parametrize("match, call", [
    ("first_stage must be one of", lambda: SIDCo(0.1, first_stage="weibull")),
    ("stages must be a positive int", lambda: SIDCo(0.1, stages=0)),
    ("values must be a float tensor", lambda: SIDCo(0.1).estimate_threshold(torch.ones(3, dtype=torch.int64))),
    ("max_scale must be a number greater than 1", lambda: MiCRO(0.1, max_scale=1.0)),
    ("gain must lie in", lambda: MiCRO(0.1, gain=0.0)),
    ("numel must be a non-negative int", lambda: planning.partition_offsets(-1, 2)),
    ("world_size must be a positive int", lambda: planning.partition_offsets(10, 0)),
    ("grads must be a non-empty sequence", lambda: simulate("topk", 0.1, [])),
    ("same number of steps", lambda: simulate("topk", 0.1, [[torch.ones(4)], []])),
    ("density must be given with a registry name", lambda: simulate("topk", grads=[[torch.ones(4)]])),
    ("sparsifier must be a registry name or a Sparsifier", lambda: simulate(TopK, 0.1, [[torch.ones(4)]])),
    ("density must be None or the instance's", lambda: simulate(TopK(0.1), 0.2, [[torch.ones(4)]])),
    ("kwargs go to build", lambda: simulate(DEFT(0.1), grads=[[torch.ones(4)]], cost_model="size")),
])
def test_bad_arguments_name_the_argument(match, call):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_partitions_are_contiguous_and_nearly_equal():
    assert planning.partition_offsets(10, 3).tolist() == [0, 4, 7, 10]
    assert planning.partition_offsets(2, 4).tolist() == [0, 1, 2, 2, 2]


@pytest.mark.parametrize("n", [2, 4])
def test_micro_workers_select_only_in_their_rotating_partition(seed, n):
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(4001, generator=gen) for _ in range(n + 1)] for _ in range(n)]
    bounds = planning.partition_offsets(4001, n).tolist()
    for t, sim in enumerate(simulate("micro", 0.02, grads)):
        for r, picked in enumerate(sim.selected):
            p = (t + r) % n
            assert picked.numel() == 0 or bounds[p] <= int(picked.min()) <= int(picked.max()) < bounds[p + 1]
        assert sum(p.numel() for p in sim.selected) == sim.sent.numel()  # exclusive: no duplicates


def test_micro_threshold_steers_the_count_toward_k(seed):
    # Stationary Laplace gradients: the sent count settles near k = 1% of N.
    gen = torch.Generator().manual_seed(seed)
    s = MiCRO(0.01)
    counts = []
    for _ in range(30):
        u = torch.rand(20_000, generator=gen)
        g = torch.where(torch.rand(20_000, generator=gen) < 0.5, 1.0, -1.0) * -torch.log(u)
        counts.append(driver.step(s, g)[1].sent)
    late = sum(counts[-10:]) / 10
    assert 0.6 * 200 <= late <= 1.6 * 200, counts


def test_micro_state_round_trip_validates_the_thresholds():
    s = MiCRO(0.1)
    driver.step(s, torch.randn(100))
    state = s.state_dict()
    assert len(state["extra"]["thresholds"]) == 1
    state["extra"]["thresholds"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"thresholds'\] must be None or 1 floats"):
        MiCRO(0.1).load_state_dict(state)


def test_load_state_dict_rejects_other_algorithms_and_missing_keys():
    state = TopK(0.1).state_dict()
    with pytest.raises(ValueError, match="state is for topk"):
        DEFT(0.1).load_state_dict(state)
    del state["residual"]
    with pytest.raises(KeyError, match="residual"):
        TopK(0.1).load_state_dict(state)


def test_cpu_grad_on_an_nccl_group_is_an_error(monkeypatch):
    monkeypatch.setattr(driver.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(driver.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(driver.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(driver.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="backend is nccl, which needs CUDA tensors"):
        driver.step(TopK(0.1), torch.ones(8))


def test_grad_length_change_is_an_error():
    s = DEFT(0.1)
    driver.step(s, torch.ones(10))
    with pytest.raises(ValueError, match=r"grad length changed between steps \(10 -> 12\)"):
        driver.step(s, torch.ones(12))


def test_dense_does_not_change_the_callers_grad():
    g = torch.arange(4.0)
    out, _ = driver.step(build("dense", 1.0), g)
    assert torch.equal(g, torch.arange(4.0)) and out is not g
