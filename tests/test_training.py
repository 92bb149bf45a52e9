"""The plain API (GradientSparsifier) in one process: world size 1, torch.distributed not initialised.
The multi-process checks (equal to the DDP hook, checkpoints across ranks) are in test_hook.py."""

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from deft_kernels import DeftState, GradientSparsifier
from deft_kernels.sparsifiers import SPARSIFIERS

# Extra arguments a sparsifier needs to be built (the threshold baseline has no default lambda).
KWARGS = {"threshold": {"threshold": 0.05}}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 5))


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_step_conserves_gradient_mass(name):
    """For every sparsifier: output + new residual == gradient + old residual (error feedback loses
    nothing), the output is sparse where the algorithm is, and the residual persists across steps."""
    model = _model()
    gs = GradientSparsifier(model, sparsifier=name, density=0.1, warmup_steps=0, **KWARGS.get(name, {}))
    old_residual = torch.zeros(sum(p.numel() for p in model.parameters()))
    for step in range(3):
        _backward(model, step)
        grad = _flat_grads(model).clone()
        stats = gs.step()
        out = _flat_grads(model)
        (sp,) = gs.sparsifiers
        residual = sp.residual
        residual = torch.zeros_like(out) if residual is None else residual
        torch.testing.assert_close(out + residual, grad + old_residual, msg=f"{name} step {step}")
        assert len(stats) == 1 and stats[0].numel == out.numel()
        assert int(out.count_nonzero()) <= stats[0].sent
        if name != "dense":
            assert stats[0].sent < out.numel()
        old_residual = residual.clone()
    assert gs.step_count == 3 and gs.compression_stats()["steps"] == 3


def test_one_warmup_default():
    """The DDP hook and the plain API warm up alike unless told otherwise; their docstrings and the
    README say the same value."""
    defaults = {cls: inspect.signature(cls).parameters["warmup_steps"].default for cls in (DeftState, GradientSparsifier)}
    assert defaults[GradientSparsifier] == defaults[DeftState] == 10
    assert GradientSparsifier(_model()).warmup_steps == DeftState().warmup_steps
    assert "(default 10," in " ".join(GradientSparsifier.__doc__.split())
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert re.search(r"DeftState\(process_group=None, [^)]*warmup_steps=10\b", readme)
    assert "Both warm up with 10 dense steps by default" in readme


def test_topk_sends_the_largest_magnitudes():
    model = _model()
    _backward(model, 0)
    grad = _flat_grads(model).clone()
    gs = GradientSparsifier(model, sparsifier="topk", density=0.05, warmup_steps=0)
    gs.step()
    k = int(0.05 * grad.numel())
    expected = torch.zeros_like(grad)
    top = grad.abs().topk(k).indices
    expected[top] = grad[top]
    torch.testing.assert_close(_flat_grads(model), expected, rtol=0, atol=0)


def test_warmup_steps_leave_gradients_dense():
    model = _model()
    gs = GradientSparsifier(model, sparsifier="deft", density=0.05, warmup_steps=2)
    for step in range(2):
        _backward(model, step)
        grad = _flat_grads(model).clone()
        assert gs.step() == []
        torch.testing.assert_close(_flat_grads(model), grad, rtol=0, atol=0)
    _backward(model, 2)
    assert len(gs.step()) == 1
    assert int(_flat_grads(model).count_nonzero()) < grad.numel() // 2


def test_none_grad_counts_as_zero():
    model = _model()
    extra = nn.Parameter(torch.randn(7))  # never used: its grad stays None
    gs = GradientSparsifier(list(model.parameters()) + [extra], sparsifier="topk", density=0.1, warmup_steps=0)
    _backward(model, 0)
    assert extra.grad is None
    grad = torch.cat([_flat_grads(model), torch.zeros(7)])
    gs.step()
    assert extra.grad is not None and extra.grad.shape == extra.shape
    out = torch.cat([_flat_grads(model), extra.grad])
    torch.testing.assert_close(out + gs.sparsifiers[0].residual, grad)


def test_parameters_grouped_by_dtype():
    model = _model()
    half = nn.Parameter(torch.randn(30, dtype=torch.bfloat16))
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    gs = GradientSparsifier(list(model.parameters()) + [half, frozen], sparsifier="topk", density=0.1,
                            warmup_steps=0)
    assert len(gs.sparsifiers) == 2
    _backward(model, 0)
    half.grad = torch.randn(30, dtype=torch.bfloat16)
    stats = gs.step()
    assert [s.numel for s in stats] == [sum(p.numel() for p in model.parameters()), 30]
    assert half.grad.dtype == torch.bfloat16 and frozen.grad is None
    assert int(half.grad.count_nonzero()) == int(0.1 * 30)


def test_checkpoint_round_trip(tmp_path):
    """6 steps straight == 3 steps, save, rebuild model/optimizer/sparsifier, load, 3 steps."""
    def run(model, gs, opt, steps):
        for step in steps:
            _backward(model, step)
            gs.step()
            opt.step()

    straight = _model()
    opt = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
    run(straight, GradientSparsifier(straight, density=0.05, warmup_steps=1), opt, range(6))

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gs = GradientSparsifier(model, density=0.05, warmup_steps=1)
    run(model, gs, opt, range(3))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gs": gs.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt")
    model = _model(seed=123)
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ckpt["opt"])
    gs = GradientSparsifier(model, density=0.05, warmup_steps=1)
    gs.load_state_dict(ckpt["gs"])
    assert gs.step_count == 3
    run(model, gs, opt, range(3, 6))
    torch.testing.assert_close(list(model.parameters()), list(straight.parameters()), rtol=0, atol=0)


def test_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="model_or_params has no parameters that require grad"):
        GradientSparsifier(nn.ReLU())
    with pytest.raises(ValueError, match="model_or_params has no parameters that require grad"):
        GradientSparsifier([nn.Parameter(torch.ones(2), requires_grad=False)])
    with pytest.raises(TypeError, match="model_or_params must be"):
        GradientSparsifier(torch.ones(3, requires_grad=True))
    with pytest.raises(TypeError, match="model_or_params must be"):
        GradientSparsifier(3)
    with pytest.raises(TypeError, match=r"model_or_params\[1\]"):
        GradientSparsifier([nn.Parameter(torch.ones(2)), "w"])
    with pytest.raises(ValueError, match="more than once"):
        p = nn.Parameter(torch.ones(2))
        GradientSparsifier([p, p])
    with pytest.raises(ValueError, match="several devices"):
        GradientSparsifier([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, device="meta"))])
    with pytest.raises(TypeError, match="floating"):
        GradientSparsifier([torch.ones(2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="density"):
        GradientSparsifier(model, density=0)
    with pytest.raises(TypeError, match="density"):
        GradientSparsifier(model, density=None)
    with pytest.raises(ValueError, match="warmup_steps"):
        GradientSparsifier(model, warmup_steps=-1)
    with pytest.raises(ValueError, match="sparsifier"):
        GradientSparsifier(model, sparsifier="powersgd")
    with pytest.raises(TypeError, match="group"):
        GradientSparsifier(model, group=0)

    gs = GradientSparsifier(model, density=0.1)
    with pytest.raises(ValueError, match="state_dict must be"):
        gs.load_state_dict({"step_count": 1})
    other = GradientSparsifier(nn.Linear(3, 3), density=0.1)
    with pytest.raises(ValueError, match="other parameters"):
        gs.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="density"):
        gs.load_state_dict(GradientSparsifier(model, density=0.2).state_dict())

    emb = nn.Embedding(10, 4, sparse=True)
    gs = GradientSparsifier(emb, density=0.5)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse grad"):
        gs.step()


@pytest.mark.parametrize("kwargs,hint", [
    ({"warmup": 5}, "did you mean GradientSparsifier's warmup_steps=?"),
    ({"dens": 0.01}, "did you mean GradientSparsifier's density=?"),
    ({"residual_type": torch.float32}, "did you mean residual_dtype=?"),
    ({"threshold": 0.1}, "threshold= is an option of sparsifier 'threshold'"),
])
def test_misspelt_keyword_names_the_argument_it_resembles(kwargs, hint):
    with pytest.raises(TypeError, match="sparsifier 'deft' takes no keyword argument") as raised:
        GradientSparsifier(_model(), sparsifier="deft", density=0.1, **kwargs)
    assert hint in str(raised.value)
    assert "its options: cost_model=, plan=, residual_dtype=" in str(raised.value)
    assert "GradientSparsifier takes model_or_params=, sparsifier=, density=, group=, warmup_steps=" in str(raised.value)


def test_misspelt_keyword_of_a_factory_is_named():
    def factory(density, *, depth=2):
        return SPARSIFIERS["topk"](density)

    with pytest.raises(TypeError, match=r"sparsifier factory 'factory' takes no keyword argument 'dept'; did you mean depth="):
        GradientSparsifier(_model(), sparsifier=factory, density=0.1, dept=3)
    GradientSparsifier(_model(), sparsifier=factory, density=0.1, depth=3)  # its own keyword passes


def test_density_one_warns_that_it_sends_everything():
    with pytest.warns(UserWarning, match=r"density=1 sends every element .* as sparsifier='dense' does.*density=0.01"):
        gs = GradientSparsifier(_model(), sparsifier="deft", density=1)
    assert gs.density == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: below 1, or the dense sparsifier itself
        GradientSparsifier(_model(), sparsifier="deft", density=0.99)
        GradientSparsifier(_model(), sparsifier="dense", density=1)


def test_density_one_warns_once_per_call_site():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own filter for a UserWarning
        for _ in range(3):
            GradientSparsifier(_model(), sparsifier="topk", density=1.0)
    assert [str(w.message)[:30] for w in seen] == ["density=1 sends every element "]
    assert seen[0].filename == __file__  # it points at the user's line, not at the library
