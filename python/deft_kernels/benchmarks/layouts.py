"""Parameter layouts (tensor names and sizes, in ``model.parameters()`` order) of reference models,
computed from their architecture alone: benchmarks of the ops need the layout, not the model.

``deft_kernels.benchmarks.models`` builds the actual modules; a test checks that they agree.
"""

from __future__ import annotations

__all__ = ["resnet50_layout", "gpt2_small_layout", "gpt2_xl_layout"]


def _bottleneck_stage(prefix: str, in_ch: int, width: int, blocks: int) -> tuple[list[tuple[str, int]], int]:
    out_ch = width * 4
    layout: list[tuple[str, int]] = []
    for b in range(blocks):
        p = f"{prefix}.{b}"
        cin = in_ch if b == 0 else out_ch
        for name, numel, ch in ((f"{p}.conv1", cin * width, width), (f"{p}.conv2", width * width * 9, width),
                                (f"{p}.conv3", width * out_ch, out_ch)):
            layout += [(f"{name}.weight", numel), (f"{name}.bn.weight", ch), (f"{name}.bn.bias", ch)]
        if b == 0:
            layout += [(f"{p}.downsample.weight", cin * out_ch), (f"{p}.downsample.bn.weight", out_ch),
                       (f"{p}.downsample.bn.bias", out_ch)]
    return layout, out_ch


def resnet50_layout(num_classes: int = 1000, stem_kernel: int = 7) -> list[tuple[str, int]]:
    """ResNet-50 (bottleneck blocks 3-4-6-3, batch-norm affine parameters, no conv biases).
    The ImageNet form (7x7 stem, 1000 classes) has 25,557,032 parameters in 161 tensors."""
    layout = [("conv1.weight", 3 * 64 * stem_kernel * stem_kernel), ("bn1.weight", 64), ("bn1.bias", 64)]
    ch = 64
    for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        stage, ch = _bottleneck_stage(f"layer{i}", ch, width, blocks)
        layout += stage
    return layout + [("fc.weight", ch * num_classes), ("fc.bias", num_classes)]


def gpt2_small_layout(vocab: int = 50257, context: int = 1024, dim: int = 768, layers: int = 12) -> list[tuple[str, int]]:
    """GPT-2 small (tied input/output embedding): 124,439,808 parameters in 148 tensors."""
    layout = [("wte.weight", vocab * dim), ("wpe.weight", context * dim)]
    for i in range(layers):
        p = f"h.{i}"
        layout += [(f"{p}.ln_1.weight", dim), (f"{p}.ln_1.bias", dim),
                   (f"{p}.attn.c_attn.weight", dim * 3 * dim), (f"{p}.attn.c_attn.bias", 3 * dim),
                   (f"{p}.attn.c_proj.weight", dim * dim), (f"{p}.attn.c_proj.bias", dim),
                   (f"{p}.ln_2.weight", dim), (f"{p}.ln_2.bias", dim),
                   (f"{p}.mlp.c_fc.weight", dim * 4 * dim), (f"{p}.mlp.c_fc.bias", 4 * dim),
                   (f"{p}.mlp.c_proj.weight", 4 * dim * dim), (f"{p}.mlp.c_proj.bias", dim)]
    return layout + [("ln_f.weight", dim), ("ln_f.bias", dim)]


def gpt2_xl_layout() -> list[tuple[str, int]]:
    """GPT-2 XL, the same architecture 48 layers deep and 1600 wide: 1,557,611,200 parameters in
    580 tensors (the 1.56B layout of the GPU benchmark)."""
    return gpt2_small_layout(dim=1600, layers=48)
