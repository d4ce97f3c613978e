"""Benchmark sdim_gather: B candidates read their G buckets (x-axis B; cost does not depend on L).

    python benchmarks/kernels/bench_sdim_gather.py [--dtype fp32|bf16] [--fwd-only] [--device cuda|cpu]
        [--layout serving|training]
"""

from __future__ import annotations

import _common as C
import torch

from triton_kernels import Backend, sdim_gather

NUM_HASHES, HASH_BITS = 16, 3
GPU_BATCHES, CPU_BATCHES = [64, 1024, 16384], [1, 8, 64]


def make_case(args, batch: int) -> C.Case:
    u = 1 if args.layout == "serving" else batch
    d, c = args.dim, 2**HASH_BITS
    dtype = C.DTYPES[args.dtype]
    sums = torch.randn(u, NUM_HASHES, c, d, device=args.device, dtype=dtype).requires_grad_(not args.fwd_only)
    counts = torch.ones(u, NUM_HASHES, c, dtype=torch.int32, device=args.device)
    cand_codes = torch.randint(0, c, (batch, NUM_HASHES), device=args.device)
    users = torch.zeros(batch, dtype=torch.int64, device=args.device) if u == 1 else torch.arange(
        batch, device=args.device)

    def fn(backend):
        return C.backward_of(lambda: sdim_gather(sums, counts, cand_codes, users, backend=backend),
                             args.fwd_only)

    moved = batch * (NUM_HASHES * (d * C.elt(args) + 8) + 8 + d * C.elt(args))
    if not args.fwd_only:
        moved += batch * d * C.elt(args) + sums.numel() * 4
    return C.Case(shape={"B": batch, "U": u, "L": 0, "d": d},
                  fns={"torch": fn(Backend.TORCH), "triton": fn(Backend.TRITON)}, bytes_moved=moved,
                  grad_to_none=None if args.fwd_only else [sums])


if __name__ == "__main__":
    cli = C.parse_args(__doc__)
    C.run("sdim_gather", cli, make_case, xs=GPU_BATCHES if cli.device == "cuda" else CPU_BATCHES)
