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


def test_users_first_then_the_internals():
    text = (ROOT / "docs" / "api.md").read_text()
    users, internals = text.index("\n## For users\n"), text.index("\n## Internals\n")
    assert users < internals
    for name in ("### `deft_kernels.DeftState(", "### `deft_kernels.deft_hook(", "### `deft_kernels.GradientSparsifier(",
                 "#### `deft_kernels.sparsifiers.StepStats(", "#### `compression_stats()`", "### `deft_kernels.metrics`",
                 "#### `deft_kernels.metrics.StepMetrics(", "### `deft_kernels.elastic`"):
        assert users < text.index(name) < internals, name
    for name in ("`deft_kernels.driver.ExchangeQueue(", "`deft_kernels.driver.HEADER_DTYPE`", ".plan_wire(",
                 "### `deft_kernels.ops`"):
        assert text.index(name) > internals, name


def test_every_reported_field_is_documented_with_its_unit():
    """StepStats, compression_stats() and the metrics: every field has its meaning beside it, and the
    figures of StepStats and compression_stats() say their unit."""
    from dataclasses import fields

    from deft_kernels._integration import COMPRESSION_STATS, CompressionLog
    from deft_kernels.metrics import BucketMetrics, StepMetrics
    from deft_kernels.sparsifiers import StepStats

    sys.path.insert(0, str(ROOT / "scripts"))
    from api_docs import field_docs as docs
    for cls in (StepStats, StepMetrics, BucketMetrics):
        documented = docs(cls)
        assert list(documented) == [f.name for f in fields(cls)], cls
        assert all(text for _, text in documented.values()), {k: v for k, v in documented.items() if not v[1]}
    units = ("elements", "bytes", "seconds", "steps", "fraction", "numel / sent")
    for name, (_, text) in docs(StepStats).items():
        assert any(unit in text for unit in units), name
    assert set(COMPRESSION_STATS) == set(CompressionLog().summary())
    for key, text in COMPRESSION_STATS.items():
        assert any(unit in text for unit in units), key
    text = (ROOT / "docs" / "api.md").read_text()
    assert "| `selected` | `int` | elements this worker proposed" in text
    assert "| `bytes_sent` | bytes this rank put on the wire" in text
