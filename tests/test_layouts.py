from deft_kernels.layouts import gpt2_small_layout, offsets_of, resnet50_layout


def test_resnet50_layout_matches_published_parameter_count():
    layout = resnet50_layout()
    assert len(layout) == 161
    assert sum(n for _, n in layout) == 25_557_032


def test_gpt2_small_layout_matches_published_parameter_count():
    layout = gpt2_small_layout()
    assert len(layout) == 148
    assert sum(n for _, n in layout) == 124_439_808


def test_offsets_of_accepts_sizes_and_pairs():
    assert offsets_of([3, 0, 2]) == [0, 3, 3, 5]
    assert offsets_of([("a", 3), ("b", 2)]) == [0, 3, 5]
