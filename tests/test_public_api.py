"""The package's public surface: __all__ in every public module, py.typed in the installed package,
and constructor errors that name the sparsifier and the argument."""

import importlib
import importlib.resources
import pydoc

import pytest

import deft_kernels
from deft_kernels import DeftState, GradientSparsifier, sparsifiers

PUBLIC_MODULES = ["deft_kernels", "deft_kernels.ops", "deft_kernels.reference", "deft_kernels.planning",
                  "deft_kernels.hook", "deft_kernels.training", "deft_kernels.metrics", "deft_kernels.elastic", "deft_kernels.sparsifiers",
                  "deft_kernels.benchmarks.worker_count", "deft_kernels.benchmarks.cli", "deft_kernels.benchmarks.models",
                  "deft_kernels.benchmarks.layouts"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_declares_all_and_every_name_exists(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    assert len(set(module.__all__)) == len(module.__all__)
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which it does not define"


def test_help_shows_the_integration_api():
    text = pydoc.render_doc(deft_kernels, renderer=pydoc.plaintext)
    for name in ("DeftState", "deft_hook", "GradientSparsifier", "segmented_topk"):
        assert name in text


def test_installed_package_is_typed():
    assert importlib.resources.files("deft_kernels").joinpath("py.typed").is_file()


def test_threshold_without_threshold_names_the_argument():
    for make in (lambda: sparsifiers.build("threshold", 0.01), lambda: DeftState(sparsifier="threshold"),
                 lambda: GradientSparsifier(__import__("torch").nn.Linear(2, 2), sparsifier="threshold")):
        with pytest.raises(TypeError, match=r"sparsifier 'threshold' needs the keyword argument threshold="):
            make()
    assert sparsifiers.build("threshold", 0.01, threshold=0.5).threshold == 0.5


@pytest.mark.parametrize("name", sorted(sparsifiers.SPARSIFIERS))
def test_unknown_keyword_names_sparsifier_argument_and_options(name):
    with pytest.raises(TypeError, match=rf"sparsifier '{name}' takes no keyword argument 'treshold'; its options: "):
        sparsifiers.build(name, 0.01, treshold=0.5)
    with pytest.raises(TypeError, match=rf"sparsifier '{name}' takes no keyword argument 'treshold'"):
        DeftState(sparsifier=name, treshold=0.5)



def test_keyword_hint_helper_names_deftstate_arguments():
    """The helper DeftState calls on its **sparsifier_kwargs (deft_kernels._integration.check_options)
    reads DeftState's own arguments from its signature."""
    from deft_kernels._integration import check_options

    with pytest.raises(TypeError, match=r"sparsifier 'deft' takes no keyword argument 'warmup'; "
                                        r"did you mean DeftState's warmup_steps=\?"):
        check_options("deft", {"warmup": 5}, DeftState)
    with pytest.raises(TypeError, match=r"'group'; did you mean DeftState's process_group=\?"):
        check_options("topk", {"group": None}, DeftState)
    check_options("deft", {"cost_model": "norm"}, DeftState)  # an option of the sparsifier passes
    with pytest.raises(TypeError, match=r"did you mean DeftState's warmup_steps=\?"):  # and DeftState calls it
        DeftState(warmup=5)
    with pytest.raises(TypeError, match=r"'plans'; did you mean .*plan="):
        DeftState(plans="leader")
    DeftState(plan="leader")


def test_deftstate_density_one_warns():
    with pytest.warns(UserWarning, match="density=1 sends every element"):
        DeftState(sparsifier="deft", density=1)
