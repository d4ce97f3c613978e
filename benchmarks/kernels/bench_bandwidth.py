"""Measure the device-memory ceiling the kernel benchmarks are judged against (issue 5: ≥ 50% of it).

    python benchmarks/kernels/bench_bandwidth.py [--mib 2048]

A device-to-device copy of a large buffer, counting bytes read plus bytes written, timed with
``triton.testing.do_bench`` (CUDA events, median). The buffer is far larger than L2, so this is
HBM, not cache. Prints one JSON line: {"op": "d2d_copy", "device", "gpu", "mib", "ms_p50", "gbps"}.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=2048, help="buffer size in MiB (default 2048)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device: the ceiling is the GPU's memory bandwidth")
    import triton.testing

    n = args.mib * 2**20 // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    assert torch.equal(dst, src), "copy did not land"
    moved = 2 * src.numel() * src.element_size()
    print(json.dumps({"op": "d2d_copy", "device": "cuda", "gpu": torch.cuda.get_device_name(),
                      "mib": args.mib, "ms_p50": round(ms, 4), "gbps": round(moved / (ms * 1e-3) / 1e9, 1)}),
          flush=True)


if __name__ == "__main__":
    main()
