"""The shared driver.step on one process (world size 1, no torch.distributed): error feedback,
state round trip and the input checks. Multi-process behaviour is in tests/test_distributed.py."""

import pytest
import torch

from deft_kernels import driver, reference
from deft_kernels.sparsifiers import SPARSIFIERS, TopK, build

KWARGS = {"threshold": {"threshold": 0.5}}  # constructor arguments beyond the density


def test_topk_step_sends_the_top_k_and_conserves_the_accumulated_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    s = TopK(0.05)
    for _ in range(3):
        g = torch.randn(1000, generator=gen)
        acc = g + (s.residual if s.residual is not None else 0)
        out, stats = driver.step(s, g, sizes=[600, 400])
        expect = reference.segmented_topk(acc, torch.tensor([0, 1000]), torch.tensor([50]))
        assert torch.equal(torch.nonzero(out).flatten(), expect)
        assert torch.equal(out + s.residual, acc)  # exact: every element is either sent or kept
        assert (stats.selected, stats.sent, stats.numel) == (50, 50, 1000)
    assert s.step_count == 3


def test_dense_step_returns_the_gradient_without_residual(seed):
    g = torch.randn(100, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    out, stats = driver.step(build("dense", 1.0), g)
    assert torch.equal(out, g) and stats.density == 1.0


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_state_dict_round_trip_continues_exactly(seed, name):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(500, generator=gen) for _ in range(4)]
    straight, resumed = build(name, 0.1, **KWARGS.get(name, {})), build(name, 0.1, **KWARGS.get(name, {}))
    outs = [driver.step(straight, g)[0] for g in grads]
    for g in grads[:2]:
        driver.step(resumed, g)
    fresh = build(name, 0.1, **KWARGS.get(name, {}))
    fresh.load_state_dict(resumed.state_dict())
    assert fresh.step_count == 2
    assert all(torch.equal(driver.step(fresh, g)[0], o) for g, o in zip(grads[2:], outs[2:]))


@pytest.mark.parametrize("match, call", [
    ("grad must be a float tensor", lambda s: driver.step(s, torch.zeros(10, dtype=torch.int64))),
    ("grad must be a flat 1-D", lambda s: driver.step(s, torch.zeros(2, 5))),
    ("grad must be a torch.Tensor", lambda s: driver.step(s, [0.0] * 10)),
    ("sizes must .* sum to grad.numel", lambda s: driver.step(s, torch.zeros(10), sizes=[4, 4])),
])
def test_bad_step_input_names_the_argument(match, call):
    with pytest.raises((TypeError, ValueError), match=match):
        call(TopK(0.1))


def test_layout_change_between_steps_is_an_error():
    s = TopK(0.1)
    driver.step(s, torch.ones(10), sizes=[5, 5])
    with pytest.raises(ValueError, match="layout"):
        driver.step(s, torch.ones(10), sizes=[4, 6])
    with pytest.raises(ValueError, match="earlier steps were"):
        driver.step(s, torch.ones(10, dtype=torch.float16), sizes=[5, 5])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, "0.1"])
def test_density_outside_the_unit_interval_is_an_error(density):
    with pytest.raises(ValueError, match="density"):
        TopK(density)


def test_unknown_sparsifier_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="name must be one of"):
        build("nope", 0.1)


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_simulation_runs_every_op_from_the_reference(seed, name, monkeypatch):
    # simulate() is the oracle of the multi-process tests: every op a sparsifier's step calls must be
    # the plain-PyTorch reference there, not the C++ kernel it is checking (the threshold
    # sparsifiers once took threshold_select from the C++ ops whatever kernels they were given).
    from deft_kernels import ops
    from deft_kernels.simulate import simulate

    def refuse(*args, **kwargs):
        raise AssertionError("the simulation called a C++/CUDA op")

    for op in ("accumulate_norms", "segmented_topk", "threshold_select", "sparse_pack", "sparse_unpack"):
        monkeypatch.setattr(torch.ops.deft_kernels, op, refuse, raising=False)
        monkeypatch.setattr(ops, op, refuse)
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(300, generator=gen) for _ in range(3)] for _ in range(2)]
    assert len(simulate(name, 0.1, grads, sizes=[200, 100], **KWARGS.get(name, {}))) == 3
