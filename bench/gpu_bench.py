"""Host-to-GPU expert transfers, and whether they stall the compute stream.

    python bench/gpu_bench.py [--expert-mib 48] [--experts 16]

1. Raw pinned host-to-device bandwidth (one big copy) against the loader's
   path for one expert: page-locked staging -> async copy on the loader's
   copy stream -> event (LazyExpertLoader._to_device), and the same including
   the CPU copy into page-locked memory (own_copy).
2. Compute-stream time of a fixed chain of matrix products alone, while the
   loader brings experts in on its copy stream, and while the same copies
   are made the naive way (blocking, on the compute stream).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from loaders.cache import LazyExpertLoader, own_copy


def cuda_time(fn, repeat: int = 5) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of fn() on the current stream, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        a, b = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--expert-mib", type=int, default=48)
    ap.add_argument("--experts", type=int, default=16)
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    n = args.expert_mib * 2**20 // 2 // 3
    cols = 4096
    rows = n // cols
    host = {f"w{i}": torch.randn(rows, cols).to(torch.bfloat16) for i in range(3)}
    nbytes = sum(t.numel() * t.element_size() for t in host.values())

    big = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu_big = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    raw = cuda_time(lambda: gpu_big.copy_(big, non_blocking=True))

    # The loader's device path, without a server: _to_device is what _fetch uses.
    loader = LazyExpertLoader.__new__(LazyExpertLoader)
    loader.device, loader._cuda = dev, True
    loader._copy_stream = torch.cuda.Stream(dev)
    pinned = {k: own_copy(v, True) for k, v in host.items()}

    def bring_in(staged: dict[str, torch.Tensor]) -> None:
        _, ready = loader._to_device(staged)
        assert ready is not None
        ready.synchronize()

    def timed(fn, repeat: int = 7) -> float:  # type: ignore[no-untyped-def]
        fn()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    staged = timed(lambda: bring_in(pinned))
    whole = timed(lambda: bring_in({k: own_copy(v, True) for k, v in host.items()}))
    print(f"{name}; expert of {nbytes / 2**20:.0f} MiB (3 bf16 tensors)\n")
    mib = nbytes / 2**20
    print(f"raw pinned H2D, one copy of {mib:.0f} MiB: {nbytes / raw / 1e9:6.1f} GB/s")
    print(
        f"expert from page-locked staging (copy stream + event): "
        f"{nbytes / staged / 1e9:6.1f} GB/s = {raw / staged:.2f} x raw"
    )
    print(
        f"expert incl. CPU copy into page-locked memory:          "
        f"{nbytes / whole / 1e9:6.1f} GB/s = {raw / whole:.2f} x raw"
    )

    # --- does a fetch in flight stall compute? ---------------------------------
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def compute() -> None:
        x = a
        for _ in range(40):
            x = (x @ a).clamp_(-1, 1)

    alone = cuda_time(compute)

    def under_load(copies) -> float:  # type: ignore[no-untyped-def]
        stop = threading.Event()

        def feeder() -> None:
            while not stop.is_set():
                copies()

        t = threading.Thread(target=feeder)
        t.start()
        time.sleep(0.05)
        try:
            return cuda_time(compute)
        finally:
            stop.set()
            t.join()

    side = under_load(lambda: bring_in(pinned))
    naive = under_load(
        lambda: (
            [v.to(dev) for v in host.values()]
            and torch.cuda.current_stream().synchronize()
        )
    )
    print(
        f"\ncompute chain alone:                               {alone * 1000:8.1f} ms"
    )
    print(
        f"while the loader copies experts on its stream:     {side * 1000:8.1f} ms "
        f"({side / alone:.2f} x)"
    )
    print(
        f"while the same experts are copied naively:         {naive * 1000:8.1f} ms "
        f"({naive / alone:.2f} x)"
    )


if __name__ == "__main__":
    main()
