"""Benchmark target_attention (DIN unit, eval Dice, H = 36): B candidates over L behaviors (x-axis L).

    python benchmarks/kernels/bench_target_attention.py [--dtype fp32|bf16] [--fwd-only] [--max-seq-len N]
        [--device cuda|cpu] [--batch B] [--layout serving|training]
"""

from __future__ import annotations

import _common as C
import torch

from triton_kernels import Backend, target_attention

HIDDEN = 36  # DIN's activation-unit width


def make_case(args, length: int) -> C.Case:
    u, b, d = C.users_for(args), args.batch, args.dim
    dtype = C.DTYPES[args.dtype]
    t = C.make_inputs(b, u, length, d, dtype, args.device, grad=not args.fwd_only)
    g = torch.Generator().manual_seed(1)
    shapes = {"w1": (4 * d, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN,), "b2": (1,), "alpha": (HIDDEN,)}
    w = {n: (torch.randn(*s, generator=g) * 0.1).to(args.device, dtype).requires_grad_(not args.fwd_only)
         for n, s in shapes.items()}
    stats = {"dice_mean": torch.zeros(HIDDEN, device=args.device),
             "dice_var": torch.ones(HIDDEN, device=args.device)}

    def fn(backend):
        return C.backward_of(lambda: target_attention(
            t["query"], t["keys"], t["mask"], t["user_index"], w["w1"], w["b1"], w["w2"], w["b2"],
            activation="dice", alpha=w["alpha"], **stats, backend=backend), args.fwd_only)

    e = C.elt(args)
    moved = u * length * (d * e + 1) + 2 * b * d * e + (4 * d + 3) * HIDDEN * e
    if not args.fwd_only:
        moved += 2 * b * d * e + u * length * d * 4 + (4 * d + 3) * HIDDEN * 4
    ref_ws = b * length * (HIDDEN * 4 * (2 if args.fwd_only else 6) + d * 4 * (0 if u == 1 else 2))
    return C.Case(shape={"B": b, "U": u, "L": length, "d": d},
                  fns={"torch": fn(Backend.TORCH), "triton": fn(Backend.TRITON)}, bytes_moved=moved,
                  grad_to_none=None if args.fwd_only else [t["query"], t["keys"], *w.values()],
                  skip=C.budget_skip(ref_ws))


if __name__ == "__main__":
    C.run("target_attention", C.parse_args(__doc__), make_case)
