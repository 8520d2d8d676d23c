"""The fault suite at full size; prints the figures RELIABILITY.md records.

    .venv/bin/python bench/fault_suite.py                # everything
    .venv/bin/python bench/fault_suite.py --only kills --kills 200

Parts: kills (the daemon SIGKILLed at random moments during commits), fsize
(a file-size limit during a commit), soak (500 commits, 4 live nodes, Redis
restarted 3 times and the daemon once), streams (1-32 concurrent fetch
streams while commits land, daemon RSS sampled every 10 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import faults  # noqa: E402

PARTS = ("kills", "fsize", "soak", "streams")


def say(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", flush=True)


def tiny_checkpoint(dest: Path) -> Path:
    """The tests' tiny Mixtral (float32), saved with small shards."""
    from param_server.launch.tiny import tiny_mixtral

    tiny_mixtral(dtype=torch.float32).save_pretrained(dest, max_shard_size="40KB")
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these")
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--commits", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--streams", default="1,4,16,32,64")
    args = ap.parse_args()
    parts = args.only or list(PARTS)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if "kills" in parts:
            print(f"== daemon SIGKILLed during commits, {args.kills} times")
            r = faults.daemon_kills(work, args.kills, seed=2026, say=say)
            print(
                f"kills {r.kills}, mid-commit {r.kills_mid_commit} (of which "
                f"{r.in_flight_landed} had reached HEAD), versions acknowledged "
                f"{r.acknowledged}, violations {len(r.violations)}"
            )
            print(
                "daemon restart to serving: median "
                f"{statistics.median(r.restart_seconds):.2f} s, max "
                f"{max(r.restart_seconds):.2f} s"
            )
            for v in r.violations[:20]:
                print("  VIOLATION", v)
            ok &= not r.violations
        if "fsize" in parts:
            print("== file-size limit (ulimit -f 1 MiB) during a 2 MiB commit")
            f = faults.file_size_limit(work)
            for k, v in f.items():
                print(f"{k}: {v}")
            ok &= bool(f["error"]) and f["daemon_alive"] is True and not f["fsck"]
        if "soak" in parts:
            print(
                f"== soak: {args.commits} commits, {args.nodes} live nodes, "
                "Redis restarted 3 times, the daemon once"
            )
            ck = tiny_checkpoint(work / "ckpt")
            s = faults.soak(work, ck, commits=args.commits, nodes=args.nodes, say=say)
            print(
                f"commits {s.commits} (+{s.commit_failures} cut by the daemon's "
                f"kill), final version {s.final_version}, nodes on it "
                f"{s.nodes_on_final}/{s.nodes}, lost acknowledged "
                f"{len(s.lost_acknowledged)}, logits equal the exported final "
                f"version: {s.logits_match}, node errors {s.node_errors}, "
                f"{s.seconds:.0f} s"
            )
            for name, secs in s.faults:
                print(f"  converged after {name} restart in {secs:.2f} s")
            ok &= not s.lost_acknowledged and s.nodes_on_final == s.nodes
        if "streams" in parts:
            counts = tuple(int(x) for x in args.streams.split(","))
            print(f"== concurrent fetch streams {counts}, 32 x 4 MiB each, 2 rounds")
            rows = faults.concurrent_fetches(work, counts, say=say)
            print(
                f"{'streams':>7} {'fetches':>7} {'errors':>6} {'busy':>5} "
                f"{'commits':>7} {'idle MiB':>8} {'peak MiB':>8} {'GB/s':>5}"
            )
            for r in rows:
                gbs = r.fetches * 32 * 4 / 1024 / r.seconds
                print(
                    f"{r.streams:>7} {r.fetches:>7} {r.errors:>6} "
                    f"{r.busy_retries:>5} {r.commits_landed:>7} "
                    f"{r.idle_rss_mib:>8.0f} {r.peak_rss_mib:>8.0f} {gbs:>5.2f}"
                )
                ok &= r.errors == 0
    print("RESULT:", "pass" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
