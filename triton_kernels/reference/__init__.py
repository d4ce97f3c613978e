"""Pure-torch reference implementations of every kernel op (STYLE R2).

They are the oracle for tests and benchmarks and the CPU serving fallback; each has the exact
signature of its public dispatcher minus ``backend``. No ``triton`` import anywhere below here.
"""

from triton_kernels.reference.dare_search import dare_search
from triton_kernels.reference.sdim_bucket_sums import sdim_bucket_sums
from triton_kernels.reference.sdim_gather import sdim_gather
from triton_kernels.reference.sdim_hash import sdim_hash
from triton_kernels.reference.target_attention import target_attention

__all__ = ["dare_search", "sdim_bucket_sums", "sdim_gather", "sdim_hash", "target_attention"]
