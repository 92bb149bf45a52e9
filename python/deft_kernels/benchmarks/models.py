"""Built-in models for the benchmarks, in plain torch (no torchvision, nothing downloaded), each with
a synthetic batch so that forward + backward gives real gradients of a real architecture.

The names are the DEFT paper's workload families:

=============  ===============================================================  ============
name           model                                                            parameters
=============  ===============================================================  ============
``resnet18``   ResNet-18, CIFAR form (3x3 stem, no max-pool), 32x32 images       11,173,962
``resnet50``   ResNet-50, CIFAR form, 32x32 images                              23,520,842
``lstm``       2-layer LSTM language model (vocabulary 10,000, width 650)       19,780,400
``ncf``        NeuMF recommender (MovieLens-1M users/items, GMF + MLP towers)     1,912,513
``gpt2``       GPT-2 small shape (tied embedding), short synthetic sequences   124,439,808
=============  ===============================================================  ============

(parameter counts at the default sizes and 10 classes). ``resnet50`` and ``gpt2`` have exactly the
parameter layouts of :mod:`deft_kernels.benchmarks.layouts` (``resnet50_layout(num_classes, stem_kernel=3)``
and ``gpt2_small_layout``), names and order included.

A *workload* is what the benchmark needs: ``(model, loss_fn)`` where ``loss_fn(model)`` draws a new
batch (from torch's global RNG, so ``torch.manual_seed`` makes it reproducible), runs the forward
pass and returns a scalar loss; ``loss_fn(model).backward()`` fills ``p.grad`` of every trainable
parameter. :func:`build` makes a built-in one by name or loads a user's one from ``"module:factory"``:

    # mymodels.py, importable from the current directory or PYTHONPATH
    def factory():
        model = MyNet()
        def loss_fn(model):
            x, y = next_batch()                  # real data or synthetic, any batch size
            return F.cross_entropy(model(x), y)  # a scalar tensor
        return model, loss_fn

    deft-bench --model mymodels:factory

The factory is called with no arguments and must return a ``torch.nn.Module`` with at least one
trainable parameter and a callable; every trainable parameter the loss does not reach gets a zero
gradient.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "build", "names", "flat_gradient", "real_gradients", "resnet18", "resnet50", "lstm_lm",
           "ncf", "gpt2", "image_batch", "token_batch", "ncf_batch"]

LossFn = Callable[[nn.Module], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Synthetic batches.


def image_batch(batch_size: int, num_classes: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-distributed ``(batch_size, 3, size, size)`` images and uniform labels."""
    _check_positive(batch_size=batch_size, num_classes=num_classes, size=size)
    return torch.randn(batch_size, 3, size, size), torch.randint(num_classes, (batch_size,))


def token_batch(batch_size: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform token ids ``(batch_size, seq_len + 1)`` split into inputs and next-token targets."""
    _check_positive(batch_size=batch_size, seq_len=seq_len, vocab=vocab)
    tokens = torch.randint(vocab, (batch_size, seq_len + 1))
    return tokens[:, :-1], tokens[:, 1:]


def ncf_batch(batch_size: int, num_users: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform user and item ids with implicit-feedback labels (1 = interaction), one in four positive
    (NCF trains with four negatives per positive)."""
    _check_positive(batch_size=batch_size, num_users=num_users, num_items=num_items)
    users = torch.randint(num_users, (batch_size,))
    items = torch.randint(num_items, (batch_size,))
    labels = (torch.rand(batch_size) < 0.25).float()
    return users, items, labels


# --------------------------------------------------------------------------------------------------
# ResNets. Parameter names follow deft_kernels.benchmarks.layouts: a convolution owns its weight and its
# batch norm (``conv1.weight``, ``conv1.bn.weight``), so the two describe the same tensors in order.


class ConvBN(nn.Module):
    """Bias-free convolution followed by batch norm, optionally ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(cout)
        self.stride, self.padding, self.relu = stride, kernel // 2, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.conv2d(x, self.weight, stride=self.stride, padding=self.padding))
        return F.relu(x) if self.relu else x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, width, 3, stride)
        self.conv2 = ConvBN(width, width, 3, relu=False)
        self.downsample = ConvBN(cin, width, 1, stride, relu=False) if stride != 1 or cin != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = ConvBN(cin, width, 1)
        self.conv2 = ConvBN(width, width, 3, stride)
        self.conv3 = ConvBN(width, out, 1, relu=False)
        self.downsample = ConvBN(cin, out, 1, stride, relu=False) if stride != 1 or cin != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + skip)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, four stages, global average pool."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stage = []
            for b in range(count):
                stage.append(block(cin, width, 2 if b == 0 and i > 1 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _classifier_workload(model: nn.Module, batch_size: int, num_classes: int) -> tuple[nn.Module, LossFn]:
    def loss_fn(m: nn.Module) -> torch.Tensor:
        x, y = image_batch(batch_size, num_classes)
        return F.cross_entropy(m(x), y)

    return model, loss_fn


def resnet18(num_classes: int = 10, batch_size: int = 8) -> tuple[nn.Module, LossFn]:
    """ResNet-18 (basic blocks 2-2-2-2) on random 32x32 images."""
    _check_positive(num_classes=num_classes, batch_size=batch_size)
    return _classifier_workload(ResNet(BasicBlock, (2, 2, 2, 2), num_classes), batch_size, num_classes)


def resnet50(num_classes: int = 10, batch_size: int = 8) -> tuple[nn.Module, LossFn]:
    """ResNet-50 (bottleneck blocks 3-4-6-3) on random 32x32 images; its parameters are
    ``layouts.resnet50_layout(num_classes, stem_kernel=3)``."""
    _check_positive(num_classes=num_classes, batch_size=batch_size)
    return _classifier_workload(ResNet(Bottleneck, (3, 4, 6, 3), num_classes), batch_size, num_classes)


# --------------------------------------------------------------------------------------------------
# LSTM language model (Zaremba et al.'s medium configuration, untied).


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, layers, batch_first=True)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.encoder(tokens))
        return self.decoder(hidden)


def lstm_lm(vocab: int = 10_000, width: int = 650, layers: int = 2, batch_size: int = 8,
            seq_len: int = 35) -> tuple[nn.Module, LossFn]:
    """Next-token cross-entropy of an LSTM language model on uniform random tokens."""
    _check_positive(vocab=vocab, width=width, layers=layers, batch_size=batch_size, seq_len=seq_len)
    model = LSTMLanguageModel(vocab, width, layers)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        x, y = token_batch(batch_size, seq_len, vocab)
        return F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))

    return model, loss_fn


# --------------------------------------------------------------------------------------------------
# NCF (He et al., WWW 2017): NeuMF = generalized matrix factorization + MLP towers, fused.


class NeuMF(nn.Module):
    def __init__(self, num_users: int, num_items: int, factors: int, mlp: tuple[int, ...]) -> None:
        super().__init__()
        self.gmf_user = nn.Embedding(num_users, factors)
        self.gmf_item = nn.Embedding(num_items, factors)
        self.mlp_user = nn.Embedding(num_users, mlp[0] // 2)
        self.mlp_item = nn.Embedding(num_items, mlp[0] // 2)
        self.mlp = nn.Sequential(*(m for a, b in zip(mlp, mlp[1:]) for m in (nn.Linear(a, b), nn.ReLU())))
        self.predict = nn.Linear(factors + mlp[-1], 1)
        for emb in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(emb.weight, std=0.01)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], dim=1))
        return self.predict(torch.cat([gmf, mlp], dim=1)).squeeze(1)


def ncf(num_users: int = 6040, num_items: int = 3706, factors: int = 64, mlp: tuple[int, ...] = (256, 128, 64),
        batch_size: int = 256) -> tuple[nn.Module, LossFn]:
    """NeuMF with binary cross-entropy on random (user, item, label) triples. Embedding gradients are
    row-sparse: only the rows of the batch's users and items are non-zero."""
    _check_positive(num_users=num_users, num_items=num_items, factors=factors, batch_size=batch_size)
    if len(mlp) < 2 or any(not isinstance(w, int) or w < 2 for w in mlp) or mlp[0] % 2:
        raise ValueError(f"mlp must be at least two layer widths >= 2, the first even, got {mlp!r}")
    model = NeuMF(num_users, num_items, factors, tuple(mlp))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        users, items, labels = ncf_batch(batch_size, num_users, num_items)
        return F.binary_cross_entropy_with_logits(m(users, items), labels)

    return model, loss_fn


# --------------------------------------------------------------------------------------------------
# GPT-2 (names and order of deft_kernels.benchmarks.layouts.gpt2_small_layout; output head tied to wte).


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def gpt2(vocab: int = 50257, context: int = 1024, dim: int = 768, layers: int = 12, heads: int = 12,
         batch_size: int = 2, seq_len: int = 32) -> tuple[nn.Module, LossFn]:
    """GPT-2 small shape by default (124M parameters, ``layouts.gpt2_small_layout``); next-token loss
    on short uniform random sequences so that forward + backward takes seconds on a CPU."""
    _check_positive(vocab=vocab, context=context, dim=dim, layers=layers, heads=heads, batch_size=batch_size,
                    seq_len=seq_len)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    if seq_len > context:
        raise ValueError(f"seq_len ({seq_len}) must not exceed context ({context})")
    model = GPT(vocab, context, dim, layers, heads)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        x, y = token_batch(batch_size, seq_len, vocab)
        return F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))

    return model, loss_fn


# --------------------------------------------------------------------------------------------------
# Registry and loading.

MODELS: dict[str, Callable[..., tuple[nn.Module, LossFn]]] = {
    "resnet18": resnet18, "resnet50": resnet50, "lstm": lstm_lm, "ncf": ncf, "gpt2": gpt2}


def names() -> list[str]:
    return sorted(MODELS)


def build(name: str, **kwargs) -> tuple[nn.Module, LossFn]:
    """The workload ``(model, loss_fn)`` called ``name``: a built-in (``MODELS``; ``kwargs`` go to its
    function, e.g. ``build("gpt2", layers=2)``) or ``"module:factory"``, a user's factory called with
    no arguments (see the module docstring for its contract)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name.lower() in MODELS:
        return MODELS[name.lower()](**kwargs)
    if ":" not in name:
        raise ValueError(f"model must be one of {names()} or 'module:factory', got {name!r}")
    if kwargs:
        raise ValueError(f"keyword arguments are for built-in models only; {name!r} is a user factory")
    return _load_factory(name)


def _load_factory(spec: str) -> tuple[nn.Module, LossFn]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r} must have the form 'module:factory'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # `deft-bench --model mymodels:factory` run next to mymodels.py
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable")
    result = factory()
    if (not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], nn.Module)
            or not callable(result[1])):
        raise ValueError(f"model {spec!r}: the factory must return (torch.nn.Module, loss_fn), "
                         f"got {type(result).__name__}")
    if not any(p.requires_grad for p in result[0].parameters()):
        raise ValueError(f"model {spec!r}: the model has no trainable parameters")
    return result


# --------------------------------------------------------------------------------------------------
# Gradients.


def flat_gradient(model: nn.Module) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The gradients of the trainable parameters laid end to end (``model.parameters()`` order), as
    one new contiguous fp32 vector, and the ``(name, numel)`` layout; a parameter without a gradient
    contributes zeros."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for _, p in params])
    return flat, [(n, p.numel()) for n, p in params]


def real_gradients(model: nn.Module, loss_fn: LossFn, count: int = 1, train_steps: int = 2,
                   lr: float = 0.01) -> tuple[list[torch.Tensor], list[tuple[str, int]]]:
    """Train ``train_steps`` SGD steps (a new batch each) so the model is past its initialisation, then
    return ``count`` gradients at the trained weights, each of its own new batch (the gradients of
    ``count`` data-parallel workers holding different data), as :func:`flat_gradient` vectors, and
    the layout."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(train_steps, int) or isinstance(train_steps, bool) or train_steps < 0:
        raise ValueError(f"train_steps must be a non-negative int, got {train_steps!r}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9)
    for _ in range(train_steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, loss_fn).backward()
        optimizer.step()
    grads = []
    for _ in range(count):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, loss_fn).backward()
        flat, layout = flat_gradient(model)
        grads.append(flat)
    optimizer.zero_grad(set_to_none=True)
    return grads, layout


def _loss(model: nn.Module, loss_fn: LossFn) -> torch.Tensor:
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss_fn(model) must return a scalar tensor that requires grad")
    if not math.isfinite(float(loss.detach())):
        raise ValueError(f"loss_fn(model) returned a non-finite loss ({float(loss.detach())})")
    return loss


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
