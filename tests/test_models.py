import sys

import pytest
import torch

from deft_kernels.benchmarks import layouts, models


def layout_of(model):
    return [(n, p.numel()) for n, p in model.named_parameters()]


def test_resnet50_is_the_cifar_form_of_the_reference_layout():
    model, _ = models.build("resnet50")
    assert layout_of(model) == layouts.resnet50_layout(num_classes=10, stem_kernel=3)
    assert sum(p.numel() for p in model.parameters()) == 23_520_842


def test_gpt2_default_is_gpt2_small_layout():
    model, _ = models.build("gpt2")
    assert layout_of(model) == layouts.gpt2_small_layout()


def test_gpt2_size_is_configurable():
    model, _ = models.build("gpt2", vocab=100, context=16, dim=32, layers=2, heads=4, seq_len=8)
    assert layout_of(model) == layouts.gpt2_small_layout(vocab=100, context=16, dim=32, layers=2)


SMALL = {
    "resnet18": dict(batch_size=2),
    "resnet50": dict(batch_size=2),
    "lstm": dict(vocab=50, width=16, batch_size=2, seq_len=5),
    "ncf": dict(num_users=30, num_items=20, factors=4, mlp=(8, 4), batch_size=16),
    "gpt2": dict(vocab=50, context=8, dim=16, layers=1, heads=2, batch_size=2, seq_len=8),
}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_builtin_gives_real_distinct_gradients(name):
    assert set(SMALL) == set(models.MODELS)
    torch.manual_seed(0)
    model, loss_fn = models.build(name, **SMALL[name])
    grads, layout = models.real_gradients(model, loss_fn, count=2, train_steps=1)
    assert [n for n, _ in layout] == [n for n, p in model.named_parameters()]
    assert all(g.numel() == sum(s for _, s in layout) and g.dtype == torch.float32 for g in grads)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert not torch.equal(grads[0], grads[1])  # two workers, two batches


def test_ncf_embedding_gradient_is_row_sparse():
    torch.manual_seed(0)
    model, loss_fn = models.build("ncf", num_users=1000, num_items=500, batch_size=8)
    loss_fn(model).backward()
    touched = (model.gmf_user.weight.grad.abs().sum(1) > 0).sum()
    assert 0 < touched <= 8


def test_unknown_model_names_the_argument():
    with pytest.raises(ValueError, match="model must be one of"):
        models.build("resnet51")
    with pytest.raises(ValueError, match="model must be a non-empty string"):
        models.build("")


def test_bad_builtin_arguments_name_the_argument():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        models.build("resnet18", batch_size=0)
    with pytest.raises(ValueError, match="dim .* multiple of heads"):
        models.build("gpt2", dim=10, heads=3)
    with pytest.raises(ValueError, match="seq_len .* must not exceed context"):
        models.build("gpt2", context=4, seq_len=8)
    with pytest.raises(ValueError, match="count must be a positive int"):
        models.real_gradients(*models.build("ncf", **SMALL["ncf"]), count=0)
    with pytest.raises(TypeError):
        models.build("ncf", no_such_option=1)
    for call, name in ((lambda: models.image_batch(0, 10), "batch_size"), (lambda: models.token_batch(2, 0, 9), "seq_len"),
                       (lambda: models.ncf_batch(2, 0, 5), "num_users")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            call()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        models.flat_gradient("resnet18")


FACTORY = '''
import torch
import torch.nn.functional as F

def factory():
    model = torch.nn.Linear(4, 3)
    def loss_fn(m):
        return F.cross_entropy(m(torch.randn(5, 4)), torch.randint(3, (5,)))
    return model, loss_fn

def wrong():
    return torch.nn.Linear(4, 3)

def frozen():
    model = torch.nn.Linear(4, 3).requires_grad_(False)
    return model, lambda m: m(torch.randn(2, 4)).sum()

def no_grad_loss():
    return torch.nn.Linear(4, 3), lambda m: torch.tensor(1.0)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_models_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)  # found from the current directory, as the CLI documents
    yield name
    sys.modules.pop(name, None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_user_factory_is_loaded_from_module_colon_factory(user_module):
    model, loss_fn = models.build(f"{user_module}:factory")
    grads, layout = models.real_gradients(model, loss_fn, train_steps=0)
    assert layout == [("weight", 12), ("bias", 3)]
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("attr,message", [
    ("wrong", r"must return \(torch.nn.Module, loss_fn\)"),
    ("frozen", "no trainable parameters"),
    ("NOT_CALLABLE", "is not callable"),
    ("missing", "has no attribute 'missing'"),
])
def test_bad_user_factories_are_explained(user_module, attr, message):
    with pytest.raises(ValueError, match=message):
        models.build(f"{user_module}:{attr}")


def test_user_loss_must_be_differentiable(user_module):
    with pytest.raises(ValueError, match="scalar tensor that requires grad"):
        models.real_gradients(*models.build(f"{user_module}:no_grad_loss"))


def test_unimportable_module_is_explained():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        models.build("no_such_module_xyz:factory")
    with pytest.raises(ValueError, match="form 'module:factory'"):
        models.build(":factory")
    with pytest.raises(ValueError, match="keyword arguments are for built-in models only"):
        models.build("x:y", batch_size=2)
