"""Sweep a kernel's launch choices on a GPU in one process (the configs' env overrides).

    python benchmarks/kernels/sweep.py dare_search CTRSTREAM_DARE_CONFIG "BLOCK_B=16,32;num_warps=4,8" \\
        [--x 100000] [--fwd-only] [--dtype fp32] [--batch 1024] [--layout serving]

Builds the inputs once with the op's benchmark ``make_case`` (same shapes and bytes as
``bench_<op>.py``), then for every combination of the grid sets the override variable and times
the Triton provider with ``triton.testing.do_bench`` (median). Prints one JSON line per
combination, the default (variable unset) first, then the fastest.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys

import _common as C
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("op")
    p.add_argument("env_var")
    p.add_argument("grid", help='"NAME=v1,v2;NAME2=v3,v4"')
    p.add_argument("--x", type=int, action="append", help="x-axis value(s) (L, or B for sdim_gather)")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layout", choices=["serving", "training"], default="serving")
    args = p.parse_args()
    import triton.testing

    args.device = "cuda"
    bench = importlib.import_module(f"bench_{args.op}")
    axes = [(name, values.split(",")) for name, _, values in (part.partition("=") for part in args.grid.split(";"))]
    combos = [",".join(f"{n}={v}" for n, v in zip([a[0] for a in axes], vs))
              for vs in itertools.product(*[a[1] for a in axes])]
    for x in args.x or [C.GPU_SEQ_LENS[-1]]:
        case = bench.make_case(args, x)
        timed = []
        triton.testing.do_bench(case.fns["triton"], grad_to_none=case.grad_to_none)  # warm clocks and caches
        for combo in [""] + combos:
            os.environ[args.env_var] = combo
            try:
                ms = triton.testing.do_bench(case.fns["triton"], grad_to_none=case.grad_to_none,
                                             return_mode="median")
            except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
                print(json.dumps({"op": args.op, "x": x, "config": combo, "error": repr(exc)[:200]}), flush=True)
                continue
            timed.append((ms, combo))
            print(json.dumps({"op": args.op, "mode": "fwd" if args.fwd_only else "fwd+bwd", "dtype": args.dtype,
                              "x": x, **case.shape, "config": combo or "default", "ms_p50": round(ms, 4),
                              "gbps": round(case.bytes_moved / (ms * 1e-3) / 1e9, 1)}), flush=True)
        os.environ.pop(args.env_var, None)
        best = min(timed)
        print(f"# {args.op} x={x}: default {timed[0][0]:.4f} ms; best {best[0]:.4f} ms with {best[1] or 'default'}",
              file=sys.stderr, flush=True)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
