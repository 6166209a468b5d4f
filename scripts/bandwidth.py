#!/usr/bin/env python
"""Measure memory bandwidth on this machine, for the decode-speed bound.

Single-stream decode of a dense model reads every weight once per token, so
``tokens/s <= bandwidth / bytes read per token``. This script times, on
buffers far larger than the caches, best of ``--repeats``:

- ``numpy_copy``: ``np.copyto`` (one thread);
- ``torch_copy``: ``Tensor.copy_`` (torch's intra-op threads);
- ``torch_read``: ``Tensor.sum`` (reads only; close to what a GEMV needs);
- ``torch_gemv``: an fp32 matrix-vector product over a matrix of the same
  size (what decode actually runs; includes the arithmetic).

Copy figures count bytes read + bytes written (the STREAM "Copy" convention);
read and GEMV figures count bytes read. Prints a table, or JSON with --json.

    python scripts/bandwidth.py [--mib 512] [--repeats 5] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _best(fn, repeats: int) -> float:
    fn()  # first touch / page faults out of the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _numpy_copy(np, n: int, repeats: int) -> float:
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    t = _best(lambda: np.copyto(b, a), repeats)
    return round(2 * a.nbytes / t / 1e9, 2)


def _torch_copy_read(torch, n: int, repeats: int) -> dict:
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    t_copy = _best(lambda: y.copy_(x), repeats)
    t_read = _best(lambda: x.sum(), repeats)
    return {
        "torch_copy_gbs": round(2 * x.nbytes / t_copy / 1e9, 2),
        "torch_read_gbs": round(x.nbytes / t_read / 1e9, 2),
    }


def measure(mib: int = 512, repeats: int = 5, threads: int | None = None) -> dict:
    """Return bandwidths in GB/s (1e9 bytes/s) for the kernels listed in the module docstring."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    out: dict = {"buffer_mib": mib, "repeats": repeats, "torch_threads": torch.get_num_threads()}

    out["numpy_copy_gbs"] = _numpy_copy(np, n, repeats)
    out.update(_torch_copy_read(torch, n, repeats))

    cols = 4096
    m = torch.randn(n // cols, cols, dtype=torch.float32)
    v = torch.randn(cols, dtype=torch.float32)
    t = _best(lambda: m @ v, repeats)
    out["torch_gemv_gbs"] = round(m.nbytes / t / 1e9, 2)
    out["copy_gbs"] = max(out["numpy_copy_gbs"], out["torch_copy_gbs"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Measure memory bandwidth (GB/s) for the decode bound.")
    p.add_argument("--mib", type=int, default=512, help="buffer size in MiB (default 512; keep it >> L3)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)
    r = measure(args.mib, args.repeats, args.threads)
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
