"""The generated reference docs match the code (regenerate: python -m graphsurgeon.docs_gen docs/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphsurgeon.docs_gen import pass_catalogue, profile_schema
from graphsurgeon.registry import all_passes

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    ("name", "make"), [("passes.md", pass_catalogue), ("profile-schema.md", profile_schema)]
)
def test_generated_docs_are_current(name: str, make) -> None:
    assert (DOCS / name).read_text() == make(), (
        f"docs/{name} is stale: run python -m graphsurgeon.docs_gen docs/"
    )


def test_the_catalogue_lists_every_registered_pass_with_its_options() -> None:
    text = pass_catalogue()
    for name, cls in all_passes().items():
        assert f"\n## {name}\n" in text
        for field in cls.Options.model_fields:
            assert f"| `{field}` |" in text
