"""Benchmark dare_search: B candidates top-K search one user's L behaviors (x-axis L; K = 20).

    python benchmarks/kernels/bench_dare_search.py [--dtype fp32|bf16] [--fwd-only] [--max-seq-len N]
        [--device cuda|cpu] [--batch B] [--layout serving|training]
"""

from __future__ import annotations

import _common as C

from triton_kernels import Backend, dare_search

TOP_K = 20  # DARE's shipped scripts


def make_case(args, length: int) -> C.Case:
    u, b, d = C.users_for(args), args.batch, args.dim
    t = C.make_inputs(b, u, length, d, C.DTYPES[args.dtype], args.device, grad=not args.fwd_only)

    def fn(backend):
        return C.backward_of(lambda: dare_search(t["query"], t["keys"], t["values"], t["mask"],
                                                 t["user_index"], t["pos"], top_k=TOP_K, backend=backend),
                             args.fwd_only)

    e = C.elt(args)
    moved = u * length * (d * e + 1) + length * e + b * d * e + b * TOP_K * (d * e + 12) + b * d * e
    if not args.fwd_only:  # dout, dq, and the scattered rows of d keys / d values / d pos
        moved += b * d * e * 2 + b * TOP_K * (2 * d + 1) * 4 + 2 * u * length * d * 4
    ref_ws = b * length * (4 + 4 + 8 + 8) + (0 if u == 1 else b * length * d * 4)
    return C.Case(shape={"B": b, "U": u, "L": length, "d": d},
                  fns={"torch": fn(Backend.TORCH), "triton": fn(Backend.TRITON)}, bytes_moved=moved,
                  grad_to_none=None if args.fwd_only else [t["query"], t["keys"], t["values"], t["pos"]],
                  skip=C.budget_skip(ref_ws))


if __name__ == "__main__":
    C.run("dare_search", C.parse_args(__doc__), make_case)
