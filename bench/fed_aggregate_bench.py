"""Aggregation of client updates: ours against Flower's `aggregate_arrayrecords`.

Each variant runs in a fresh process that builds N client updates of S MiB
(float32, Flower's own NumPy encoding, so both sides read the same input),
then aggregates them once while the kernel tracks peak memory (VmHWM reset
through /proc/self/clear_refs). "Extra" is the peak above the resident size
just before aggregating, so the inputs themselves are not counted (glibc is
told to serve large blocks from mmap, so freed memory is not counted either).

    python bench/fed_aggregate_bench.py                 # 8 clients x 256 MiB
    python bench/fed_aggregate_bench.py --clients 4 --mib 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TENSOR_MIB = 4
VARIANTS = ("flower", "ours", "ours+validation", "ours-raw")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(variant: str, clients: int, mib: int) -> dict[str, float]:
    import numpy as np
    import torch
    from flwr.app import (
        Array,
        ArrayRecord,
        MessageType,
        Metadata,
        MetricRecord,
        RecordDict,
    )
    from flwr.app.message.message import make_message

    from param_server.federation import protocol, wire
    from param_server.federation.aggregate import (
        ClientUpdate,
        Layout,
        WireTensor,
        merge_into_record,
        parse_reply,
        sparse_average,
    )

    n_tensors = mib // TENSOR_MIB
    numel = TENSOR_MIB * 2**20 // 4
    keys = [f"model.layers.{i // 8}.mlp.experts.{i % 8}.w" for i in range(n_tensors)]
    rng = np.random.default_rng(0)
    records = []
    for c in range(clients):
        rec = ArrayRecord()
        for k in keys:
            a = rng.standard_normal(numel, dtype=np.float32)
            rec[k] = (
                wire.to_array(torch.from_numpy(a))
                if variant == "ours-raw"
                else Array(a)
            )
        records.append(
            RecordDict(
                {
                    protocol.ARRAYS: rec,
                    protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 100 + c}),
                }
            )
        )
    layout = Layout(
        {k: WireTensor(k, k.rsplit(".", 1)[0], k, "F32", (numel,), None) for k in keys}
    )
    current = wire.to_record({k: torch.zeros(numel) for k in keys})
    current_t = wire.from_record(current)
    # Replies arrive as Messages; building them is Flower's work, not timed.
    messages = [
        make_message(Metadata(1, "", c + 1, 0, "", "", 0.0, 60.0, MessageType.TRAIN), r)
        for c, r in enumerate(records)
    ]
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
    t0 = time.perf_counter()
    if variant == "flower":
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        out = aggregate_arrayrecords(records, protocol.NUM_EXAMPLES)
    else:
        updates = []
        for c, r in enumerate(records):
            if variant == "ours+validation":  # what every round does: parse_reply
                updates.append(
                    parse_reply(
                        messages[c],
                        layout,
                        current_t,
                        sent_dtypes=dict.fromkeys(keys, "F32"),
                    )
                )
                continue
            tensors = wire.from_record(r[protocol.ARRAYS])
            n = r[protocol.METRICS][protocol.NUM_EXAMPLES]
            updates.append(ClientUpdate(c, f"c{c}", int(n), tensors))  # type: ignore[arg-type]
        out, _ = merge_into_record(current, sparse_average(updates, layout))
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    assert len(out) == n_tensors
    return {"seconds": dt, "extra_mib": (peak - before) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--mib", type=int, default=256, help="size of one update (MiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.clients, a.mib)))
        return

    def child(variant: str, memory: bool) -> dict[str, float]:
        env = dict(os.environ)
        if memory:
            # Large blocks straight from mmap, so freed memory leaves the process
            # and the peak counts what each side really holds. (Timed runs use
            # the allocator as it comes: page faults would dominate otherwise.)
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        argv = [sys.executable, __file__, "--child", variant]
        argv += ["--clients", str(a.clients), "--mib", str(a.mib)]
        r = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
        out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {variant} {'memory' if memory else 'time'}: {out}", file=sys.stderr)
        return out

    times: dict[str, list[float]] = {v: [] for v in a.variants}
    for _ in range(a.repeats):
        for v in a.variants:  # interleaved, so drift hits every variant alike
            times[v].append(child(v, memory=False)["seconds"])
    extra = {v: child(v, memory=True)["extra_mib"] for v in a.variants}
    base = statistics.median(times["flower"]) if "flower" in times else None
    print(
        f"\n{a.clients} client updates of {a.mib} MiB (float32); time: median of "
        f"{a.repeats}; extra memory: peak above the inputs"
    )
    print(
        f"{'variant':<18}{'seconds':>9}{'speed-up':>10}{'extra MiB':>11}{'x model':>9}"
    )
    for v in a.variants:
        t = statistics.median(times[v])
        up = f"{base / t:.1f}x" if base else "-"
        print(f"{v:<18}{t:>9.3f}{up:>10}{extra[v]:>11.0f}{extra[v] / a.mib:>9.2f}")


if __name__ == "__main__":
    main()
