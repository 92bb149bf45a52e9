"""docs/api.md, the API reference, is generated from the docstrings (scripts/api_docs.py) and must
match the installed package: a docstring or a public name that changes without regenerating it
fails here."""

import importlib.util
from pathlib import Path

import deft_kernels

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date():
    text = (ROOT / "docs" / "api.md").read_text()
    assert text == _generator().render(), "docs/api.md is out of date: run .venv/bin/python scripts/api_docs.py"


def test_every_public_name_is_documented():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in deft_kernels.__all__:
        assert f"### `deft_kernels.{name}" in text or f"## `deft_kernels.{name}`" in text, name
