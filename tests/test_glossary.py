"""docs/glossary.md: every term the algorithm needs is defined there, and every link it gives leads
to a page and a heading that exist (a heading renamed elsewhere breaks its anchor here)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "docs" / "glossary.md"

TERMS = ("fragment", "local k", "bin", "LPT", "rotation", "common part", "union", "residual", "error feedback",
         "leader", "plan one step ahead", "bin imbalance", "critical path", "CLT-k", "SIDCo", "MiCRO", "density",
         "warm-up", "Top-k", "budget", "build-up", "bucket", "exposed time", "break-even bandwidth")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links() -> list[tuple[str, str]]:
    return re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", GLOSSARY.read_text())


def test_every_term_is_defined():
    headwords = " | ".join(re.findall(r"^\*\*([^*]+)\*\*", GLOSSARY.read_text(), flags=re.M)).lower()
    assert [term for term in TERMS if term.lower() not in headwords] == []


@pytest.mark.parametrize("target,anchor", _links())
def test_every_link_resolves(target, anchor):
    page = (GLOSSARY.parent / target).resolve()
    assert page.is_file(), target
    if anchor:
        headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
        assert anchor in {_anchor(h) for h in headings}, f"{target}#{anchor}"
