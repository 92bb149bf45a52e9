"""docs/api.md, the API reference, is generated from the docstrings (scripts/api_docs.py) and must
match the installed package: a docstring or a public name that changes without regenerating it
fails here."""

import subprocess
import sys
from pathlib import Path

import deft_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_up_to_date():
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def test_every_public_name_is_documented():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in deft_kernels.__all__:
        assert f"### `deft_kernels.{name}" in text or f"## `deft_kernels.{name}`" in text, name
