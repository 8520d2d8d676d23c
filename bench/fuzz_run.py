"""A long fuzz run: the property tests of tests/integration/test_fuzz.py with
many more cases, and the outcome of each.

    .venv/bin/python bench/fuzz_run.py --examples 3000

Prints how many cases each property ran and how they ended (accepted, or
refused with which status); any other outcome fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=3000, help="cases per property")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        env = dict(
            os.environ, FUZZ_EXAMPLES=str(args.examples), FUZZ_REPORT=str(report)
        )
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--timeout", "0", "tests/integration/test_fuzz.py"],
            cwd=ROOT,
            env=env,
        )  # fmt: skip
        took = time.monotonic() - t0
        outcomes = json.loads(report.read_text()) if report.exists() else {}
    print(
        f"\n{args.examples} examples per property, {took:.0f} s, "
        f"pytest exit {r.returncode}"
    )
    print(f"{'property':<10} {'cases':>7}  outcomes")
    for name, counts in sorted(outcomes.items()):
        total = sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{name:<10} {total:>7}  {detail}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
