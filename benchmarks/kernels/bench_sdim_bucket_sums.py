"""Benchmark sdim_bucket_sums: build U users' (G, 2**τ, d) bucket tables (x-axis L).

    python benchmarks/kernels/bench_sdim_bucket_sums.py [--dtype fp32|bf16] [--fwd-only] [--max-seq-len N]
        [--device cuda|cpu] [--layout serving|training]
"""

from __future__ import annotations

import _common as C
import torch

from triton_kernels import Backend, sdim_bucket_sums

NUM_HASHES, HASH_BITS = 16, 3


def make_case(args, length: int) -> C.Case:
    u, d = C.users_for(args), args.dim
    t = C.make_inputs(1, u, length, d, C.DTYPES[args.dtype], args.device, grad=not args.fwd_only)
    seq, mask = t["keys"], t["mask"]
    codes = torch.randint(0, 2**HASH_BITS, (u, length, NUM_HASHES), device=args.device)

    def fn(backend):
        def fwd():
            return sdim_bucket_sums(seq, codes, mask, hash_bits=HASH_BITS, backend=backend)[0]

        return C.backward_of(fwd, args.fwd_only)

    table = u * NUM_HASHES * 2**HASH_BITS
    moved = u * length * (d * C.elt(args) + NUM_HASHES * 8 + 1) + table * (4 * d + 4)
    if not args.fwd_only:
        moved += table * 4 * d + u * length * d * C.elt(args)
    ref_ws = u * length * NUM_HASHES * 2**HASH_BITS * (8 + 8 + 4) + 3 * seq.numel() * 4
    return C.Case(shape={"B": u, "U": u, "L": length, "d": d},
                  fns={"torch": fn(Backend.TORCH), "triton": fn(Backend.TRITON)}, bytes_moved=moved,
                  grad_to_none=None if args.fwd_only else [seq], skip=C.budget_skip(ref_ws))


if __name__ == "__main__":
    C.run("sdim_bucket_sums", C.parse_args(__doc__), make_case)
