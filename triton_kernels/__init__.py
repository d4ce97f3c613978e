"""Hot-path ops of the ranker (SDIM hashing/buckets, DARE top-K search, DIN target attention).

Each op has a torch reference (``triton_kernels.reference``), a Triton implementation
(``triton_kernels._triton``, private) and the public dispatcher exported here, which takes the
reference's exact arguments plus a trailing ``backend: Backend = Backend.AUTO`` (STYLE R1).
"""

from triton_kernels.backend import Backend, KernelUnavailableError
from triton_kernels.dare_search import dare_search
from triton_kernels.sdim_bucket_sums import sdim_bucket_sums
from triton_kernels.sdim_gather import sdim_gather
from triton_kernels.sdim_hash import sdim_hash
from triton_kernels.target_attention import target_attention

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "dare_search",
    "sdim_bucket_sums",
    "sdim_gather",
    "sdim_hash",
    "target_attention",
]
