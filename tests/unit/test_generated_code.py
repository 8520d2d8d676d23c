"""The committed generated code must equal a fresh compile of proto/."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed (pip install '.[test]')",
)
def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc produced nothing"
    committed = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "param_server" / "api").rglob("*")
        if p.is_file()
        and p.suffix in {".py", ".pyi"}
        and p.name != "__init__.py"
        and p.parent.name != "api"  # hand-written: the conversions beside it
    )
    assert fresh == committed, "generated files differ from the committed set"
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), (
            f"{rel} is stale: run `python proto/generate.py` and commit the result"
        )
