"""Private Triton layer: jit kernels, launchers and autograd Functions (STYLE R1, R7).

Import only through the public dispatchers in ``triton_kernels``; importing this package imports
``triton``, so ``TRITON_INTERPRET`` must already be set when running on CPU.
"""

__all__: list[str] = []
