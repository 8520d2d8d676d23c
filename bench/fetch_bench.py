"""Fetch the same expert bytes five ways, and time a one-expert commit.

    python bench/fetch_bench.py [--mib 256] [--repeat 5] [--commit-gib 1]

(a) raw grpcio streaming of the blob bytes, 4 MiB chunks, no protobuf: the
    ceiling for one Python stream; (b) ParamClient over gRPC, one stream and
    several; (c) ParamClient's same-host path (cold: first mapping, verified by
    SHA-256; warm: already verified); (d) safetensors.torch.load_file of the
    same files; (e) memcpy of the same bytes. Servers run in their own
    processes, as in production. Prints a table; --markdown prints rows for
    BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file

from param_server.client import ParamClient
from param_server.core import tensor_codec
from param_server.core.framing import CHUNK_BYTES, MAX_MESSAGE_BYTES
from param_server.launch.daemon import spawn_daemon
from param_server.store import Store

RAW_METHOD = "/bench.Raw/Stream"

RAW_SERVER = r"""
import sys
from concurrent import futures
from pathlib import Path
import grpc

CHUNK = int(sys.argv[2])
paths = [Path(p) for p in Path(sys.argv[1]).read_text().split()]

def stream(request, context):
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

handler = grpc.method_handlers_generic_handler("bench.Raw", {
    "Stream": grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=None, response_serializer=None)})
opts = [("grpc.max_send_message_length", CHUNK + 65536)]
server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_store(root: Path, mib: int, expert_mib: int = 4) -> tuple[Store, list[str]]:
    """A model whose experts total `mib` MiB of bf16 (3 tensors each)."""
    store = Store(root)
    n = mib // expert_mib
    cols = expert_mib * 1024 * 1024 // 2 // 3 // 1024
    with store.staging() as s:
        for e in range(n):
            s.add(
                f"layers.{e // 8}.experts.{e % 8}",
                tensor_codec.encode(
                    {
                        f"w{i}": torch.randn(1024, cols).to(torch.bfloat16)
                        for i in (1, 2, 3)
                    }
                ),
            )
        s.add("global", tensor_codec.encode({"embed": torch.randn(16, 16)}))
        store.commit("bench", 0, s)
    keys = [k for k in store.get_manifest("bench").shards if "experts" in k]
    return store, keys


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=256, help="bytes of experts to fetch")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument(
        "--commit-gib",
        type=float,
        default=1.0,
        help="model size for the commit benchmark (0 skips it)",
    )
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="param-bench-") as tmp:
        work = Path(tmp)
        store, keys = build_store(work / "store", args.mib)
        manifest = store.get_manifest("bench")
        total = sum(manifest.shards[k].size for k in keys)
        paths = [store.blob_path(manifest.shards[k].digest) for k in keys]
        (work / "paths").write_text("\n".join(map(str, paths)))

        raw, raw_port = start(
            [sys.executable, "-c", RAW_SERVER, str(work / "paths"), str(CHUNK_BYTES)]
        )
        daemon = spawn_daemon(work / "store")
        target = daemon.target
        results: dict[str, float] = {}
        try:
            ch = grpc.insecure_channel(
                f"127.0.0.1:{raw_port}",
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
            )
            call = ch.unary_stream(
                RAW_METHOD, request_serializer=None, response_deserializer=None
            )

            def raw_fetch() -> None:
                buf = bytearray(total)
                view, pos = memoryview(buf), 0
                for chunk in call(b""):
                    view[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
                assert pos == total

            results["a raw grpcio, 1 stream"] = timed(raw_fetch, args.repeat)

            for streams in (1, args.streams):
                with ParamClient(target, streams=streams, same_host=False) as c:
                    results[f"b ParamClient gRPC, {streams} stream(s)"] = timed(
                        lambda c=c: c.fetch_shards("bench", keys, manifest=manifest),
                        args.repeat,
                    )

            def cold() -> None:
                with ParamClient(target, same_host=True) as c:
                    c.fetch_shards("bench", keys, manifest=manifest)
                    assert c.stats.blobs_mapped == len(keys)

            results["c same-host, cold (SHA-256 verify)"] = timed(cold, args.repeat)
            with ParamClient(target, same_host=True) as c:
                results["c same-host, warm (verified)"] = timed(
                    lambda: c.fetch_shards("bench", keys, manifest=manifest),
                    args.repeat,
                )

                sink = bytearray(total)
                sink_addr = ctypes.addressof(ctypes.c_char.from_buffer(sink))

                def warm_copy() -> None:
                    pos = 0  # copy every mapped byte out once, like (e) does
                    for buf in c.fetch_blobs(manifest, keys).values():
                        src = ctypes.c_char.from_buffer(buf)
                        ctypes.memmove(sink_addr + pos, ctypes.addressof(src), len(buf))
                        del src
                        pos += len(buf)

                results["c same-host, warm + memcpy of every byte"] = timed(
                    warm_copy, args.repeat
                )
            results["d safetensors load_file"] = timed(
                lambda: [load_file(p) for p in paths], args.repeat
            )
            src, dst = bytearray(os.urandom(1024)) * (total // 1024), bytearray(total)
            s_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
            d_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
            results["e memcpy"] = timed(
                lambda: ctypes.memmove(d_addr, s_addr, total), args.repeat
            )
        finally:
            raw.kill()
            daemon.stop()

        gbs = {k: total / v / 1e9 for k, v in results.items()}
        a = gbs["a raw grpcio, 1 stream"]
        e = gbs["e memcpy"]
        print(
            f"\nfetching {total / 2**20:.0f} MiB ({len(keys)} expert shards), "
            f"median of {args.repeat}; {platform.node()}, {os.cpu_count()} cores\n"
        )
        print(f"{'path':<40} {'s':>8} {'GB/s':>8} {'vs a':>7} {'vs e':>7}")
        for k, v in results.items():
            print(f"{k:<40} {v:8.3f} {gbs[k]:8.2f} {gbs[k] / a:7.2f} {gbs[k] / e:7.3f}")
        if args.markdown:
            print("\n| path | seconds | GB/s | ÷ (a) | ÷ (e) |\n|---|---|---|---|---|")
            for k, v in results.items():
                print(
                    f"| {k} | {v:.3f} | {gbs[k]:.2f} | {gbs[k] / a:.2f} | "
                    f"{gbs[k] / e:.3f} |"
                )

        if args.commit_gib > 0:
            commit_bench(work, args.commit_gib, args.repeat, args.markdown)


def commit_bench(work: Path, gib: float, repeat: int, markdown: bool) -> None:
    """One changed expert of a `gib` GiB model: bytes written and time vs fsync.

    Each commit is timed next to a plain write+fsync of the same bytes to a
    new file (interleaved, so both see the same disk), for a small expert and
    a realistically sized one.
    """
    rows = []
    for expert_mib in (4, 64):
        root = work / f"big-{expert_mib}"
        store, keys = build_store(root, int(gib * 1024), expert_mib=expert_mib)
        key = keys[len(keys) // 2]
        shapes = {
            t.name: t.shape for t in store.get_manifest("bench").shards[key].tensors
        }
        fresh = iter(range(10**6))

        def expert(i: int, shapes: dict[str, tuple[int, ...]] = shapes) -> bytes:
            return tensor_codec.encode(
                {
                    n: torch.full(sh, float(i), dtype=torch.bfloat16)
                    for n, sh in shapes.items()
                }
            )

        def write_fsync(data: bytes, fresh: Iterator[int] = fresh) -> float:
            t = time.perf_counter()
            with open(work / f"plain-{next(fresh)}", "wb") as f:  # new, like a blob
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return time.perf_counter() - t

        local: list[tuple[float, float, int]] = []
        for i in range(repeat):
            data = expert(i)
            base = write_fsync(data)
            t = time.perf_counter()
            with store.staging() as s:
                s.add(key, data)
                r = store.commit("bench", store.head("bench"), s)
            local.append((time.perf_counter() - t, base, r.bytes_written))
        daemon = spawn_daemon(root)
        target = daemon.target
        remote: list[tuple[float, float, int]] = []
        try:
            with ParamClient(target) as c:
                parent = c.get_manifest("bench").version
                for i in range(repeat):
                    data = expert(100 + i)
                    base = write_fsync(data)
                    t = time.perf_counter()
                    cr = c.commit("bench", parent, {key: data})
                    remote.append((time.perf_counter() - t, base, cr.bytes_written))
                    parent = cr.manifest.version  # a committer knows its parent
        finally:
            daemon.stop()
        model_bytes = store.get_manifest("bench").total_bytes
        for name, runs in (
            ("Store.commit (in process)", local),
            ("ParamClient.commit (gRPC to the daemon)", remote),
        ):
            t = statistics.median(r[0] for r in runs)
            b = statistics.median(r[1] for r in runs)
            w = statistics.median(r[2] for r in runs)
            rows.append((f"{expert_mib} MiB expert, {name}", model_bytes, w, t, b))
    print(
        f"\ncommit of one changed expert, median of {repeat}, each next to a "
        "write+fsync of the same bytes to a new file"
    )
    for name, mb, w, t, b in rows:
        print(
            f"  {name:<52} {mb / 2**30:.2f} GiB model: wrote {w / 2**20:6.2f} MiB "
            f"({w / mb * 100:5.2f} %) in {t * 1000:7.1f} ms; write+fsync "
            f"{b * 1000:6.1f} ms; ratio {t / b:5.2f}"
        )
    if markdown:
        print(
            "\n| commit | model | bytes written | % of model | time | "
            "write+fsync | ratio |\n|---|---|---|---|---|---|---|"
        )
        for name, mb, w, t, b in rows:
            print(
                f"| {name} | {mb / 2**30:.2f} GiB | {w / 2**20:.2f} MiB | "
                f"{w / mb * 100:.2f} % | {t * 1000:.1f} ms | {b * 1000:.1f} ms | "
                f"{t / b:.2f} |"
            )


if __name__ == "__main__":
    main()
