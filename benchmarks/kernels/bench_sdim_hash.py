"""Benchmark sdim_hash: hash U user histories of length L (x-axis L). Integer output: forward only.

    python benchmarks/kernels/bench_sdim_hash.py [--dtype fp32|bf16] [--max-seq-len N] [--device cuda|cpu]
"""

from __future__ import annotations

import _common as C
import torch

from triton_kernels import Backend, sdim_hash

NUM_HASHES, HASH_BITS = 16, 3  # the paper's online setting: m = 48 bits


def make_case(args, length: int) -> C.Case:
    u = C.users_for(args)
    t = C.make_inputs(1, u, length, args.dim, C.DTYPES[args.dtype], args.device)
    proj = torch.randn(args.dim, NUM_HASHES * HASH_BITS, device=args.device)
    seq = t["keys"]

    def fn(backend):
        return lambda: sdim_hash(seq, proj, num_hashes=NUM_HASHES, hash_bits=HASH_BITS, backend=backend)

    moved = u * length * (args.dim * C.elt(args) + NUM_HASHES * 8) + proj.numel() * 4
    ref_ws = u * length * NUM_HASHES * HASH_BITS * (4 + 8 + 1) + seq.numel() * 4
    return C.Case(shape={"B": u, "U": u, "L": length, "d": args.dim},
                  fns={"torch": fn(Backend.TORCH), "triton": fn(Backend.TRITON)}, bytes_moved=moved,
                  skip=C.budget_skip(ref_ws))


if __name__ == "__main__":
    cli = C.parse_args(__doc__)
    cli.fwd_only = True  # codes are integers: there is no backward
    C.run("sdim_hash", cli, make_case)
