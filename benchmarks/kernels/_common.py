"""Shared setup factory and runner for the kernel benchmarks (STYLE R8).

Every ``bench_<op>.py`` defines a ``make_case(args, x)`` that builds inputs through
:func:`make_inputs` and returns the provider callables (``torch`` = the R2 reference, ``triton``)
plus the bytes the op must move; the x-axis is the history length L (the candidate count B for
``sdim_gather``, whose cost does not depend on L). Instead of ``triton.testing.perf_report``'s
tables, this runner prints one machine-readable JSON line per (op, shape, provider):

    {"op", "mode", "device", "gpu", "layout", "dtype", "B", "U", "L", "d", "provider", "ms_p50",
     "ms_p20", "ms_p80", "gbps", "speedup_vs_torch", "note"}

* On CUDA: ``triton.testing.do_bench`` (quantiles 0.5/0.2/0.8, ``grad_to_none`` for backward).
* On CPU (``--device cpu``): a smoke test of the **torch reference only**, with a manual
  ``perf_counter`` loop at tiny shapes. The Triton interpreter is a correctness tool, not a
  performance path, so no ``triton`` line is printed there, and the lines say so in ``note``.

GB/s uses the *compulsory* bytes: every input read once and every output written once (for
backward, add the upstream gradient read and the input gradients written). Candidates that share
a user re-read its history from cache; that re-read is not counted.
``speedup_vs_torch`` = torch p50 / provider p50, both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SEQ_LENS = [1_000, 10_000, 100_000]
CPU_SEQ_LENS = [64, 256, 1_024]
MEMORY_BUDGET_BYTES = 24 * 2**30  # skip a provider whose working set would exceed this


@dataclass
class Case:
    """One benchmark shape: callables per provider and the compulsory bytes they move."""

    shape: dict[str, int]  # printed as is, e.g. {"B": 1024, "U": 1, "L": 100000, "d": 64}
    fns: dict[str, Callable[[], object]]  # provider -> zero-arg callable (fwd, or fwd+bwd)
    bytes_moved: int
    grad_to_none: list[torch.Tensor] | None = None
    skip: dict[str, str] | None = None  # provider -> reason


def parse_args(description: str, default_batch: int = 1024) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--fwd-only", action="store_true", help="time the forward only")
    p.add_argument("--max-seq-len", type=int, default=None, help="largest history length L")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None,
                   help=f"candidates B (default {default_batch} on GPU, 8 on CPU)")
    p.add_argument("--dim", type=int, default=64, help="embedding width d (16–128)")
    p.add_argument("--layout", choices=["serving", "training"], default="serving",
                   help="serving: one user (U=1) scores B candidates; training: U == B")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but no CUDA device is visible; use --device cpu for the smoke test")
    args.batch = args.batch or (default_batch if args.device == "cuda" else 8)
    lens = GPU_SEQ_LENS if args.device == "cuda" else CPU_SEQ_LENS
    kept = [n for n in lens if args.max_seq_len is None or n <= args.max_seq_len]
    args.seq_lens = kept or [args.max_seq_len]
    return args


def make_inputs(b: int, u: int, length: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
                grad: bool = False) -> dict[str, torch.Tensor]:
    """The setup factory every script uses: candidate rows, user histories with jagged lengths."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (u,), generator=gen)
    lengths[-1] = length
    t = {
        "query": torch.randn(b, d, generator=gen),
        "keys": torch.randn(u, length, d, generator=gen),
        "values": torch.randn(u, length, d, generator=gen),
        "pos": torch.randn(length, generator=gen) * 0.1,
    }
    t = {k: v.to(device, dtype).requires_grad_(grad) for k, v in t.items()}
    t["mask"] = (torch.arange(length).view(1, -1) < lengths.view(-1, 1)).to(device)
    t["user_index"] = (torch.zeros(b, dtype=torch.int64) if u == 1 else torch.arange(b) % u).to(device)
    return t


def users_for(args: argparse.Namespace) -> int:
    return 1 if args.layout == "serving" else args.batch


def providers(args: argparse.Namespace) -> list[str]:
    return ["torch", "triton"] if args.device == "cuda" else ["torch"]


def _time_cpu(fn: Callable[[], object], reps: int = 5) -> tuple[float, float, float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q[0], q[1], q[2]


def _time(fn: Callable[[], object], device: str, grad_to_none: list[torch.Tensor] | None):
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none))
    return _time_cpu(fn)


def run(op: str, args: argparse.Namespace, make_case: Callable[[argparse.Namespace, int], Case],
        xs: list[int] | None = None) -> None:
    """Time every (x, provider) of ``op`` and print JSON lines; x defaults to the L values."""
    mode = "fwd" if args.fwd_only else "fwd+bwd"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    for x in xs if xs is not None else args.seq_lens:
        case = make_case(args, x)
        results: dict[str, tuple[float, float, float]] = {}
        for provider in providers(args):
            base = {"op": op, "mode": mode, "device": args.device, "gpu": gpu, "layout": args.layout,
                    "dtype": args.dtype, **case.shape, "provider": provider}
            reason = (case.skip or {}).get(provider)
            if reason:
                print(json.dumps({**base, "skipped": reason}), flush=True)
                continue
            results[provider] = _time(case.fns[provider], args.device, case.grad_to_none)
            p50, p20, p80 = results[provider]
            torch_p50 = results.get("torch", (math.nan,))[0]
            note = ("cpu smoke test of the torch reference; not a performance number"
                    if args.device == "cpu" else "")
            print(json.dumps({
                **base, "ms_p50": round(p50, 4), "ms_p20": round(p20, 4), "ms_p80": round(p80, 4),
                "gbps": round(case.bytes_moved / (p50 * 1e-3) / 1e9, 3),
                "speedup_vs_torch": None if math.isnan(torch_p50) else round(torch_p50 / p50, 3),
                "note": note,
            }), flush=True)
        del case
        if args.device == "cuda":
            torch.cuda.empty_cache()


def budget_skip(estimate_bytes: int, provider: str = "torch") -> dict[str, str]:
    """``Case.skip`` entry when a provider's working set would exceed the memory budget."""
    if estimate_bytes <= MEMORY_BUDGET_BYTES:
        return {}
    return {provider: f"working set ~{estimate_bytes / 2**30:.1f} GiB exceeds the "
                      f"{MEMORY_BUDGET_BYTES / 2**30:.0f} GiB benchmark budget"}


def backward_of(fn: Callable[[], torch.Tensor | tuple], fwd_only: bool) -> Callable[[], object]:
    """Wrap a forward into fwd (+ backward of the first output against a ones gradient)."""
    if fwd_only:
        return fn

    def step() -> None:
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    return step


def elt(args: argparse.Namespace) -> int:
    return torch.empty((), dtype=DTYPES[args.dtype]).element_size()
