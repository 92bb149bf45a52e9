from deft_kernels.benchmarks.layouts import gpt2_small_layout, gpt2_xl_layout, resnet50_layout
from deft_kernels.planning import offsets_of


def test_resnet50_layout_matches_published_parameter_count():
    layout = resnet50_layout()
    assert len(layout) == 161
    assert sum(n for _, n in layout) == 25_557_032


def test_gpt2_small_layout_matches_published_parameter_count():
    layout = gpt2_small_layout()
    assert len(layout) == 148
    assert sum(n for _, n in layout) == 124_439_808


def test_gpt2_xl_layout_matches_published_parameter_count():
    layout = gpt2_xl_layout()
    assert len(layout) == 580
    assert sum(n for _, n in layout) == 1_557_611_200
    assert max(n for _, n in layout) == 50257 * 1600  # the tied embedding


def test_offsets_of_accepts_sizes_and_pairs():
    assert offsets_of([3, 0, 2]) == [0, 3, 3, 5]
    assert offsets_of([("a", 3), ("b", 2)]) == [0, 3, 5]


def test_core_import_does_not_load_benchmark_code():
    import subprocess
    import sys

    code = "import sys, deft_kernels; print(sorted(m for m in sys.modules if m.startswith('deft_kernels.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
