"""RELIABILITY.md's bad-input catalogue names real tests, at least 30 of them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_catalogue_row_names_a_test_that_exists() -> None:
    doc = (ROOT / "RELIABILITY.md").read_text()
    doc = doc.split("## Bad-input catalogue", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in doc.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 30
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert refs, f"row without a test: {row}"
        for path, name in refs:
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name}"
