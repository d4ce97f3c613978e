"""Only the C extension; everything else about the package is in pyproject.toml.

``pipeline._fastdecode`` is the worker's decode fast path (pipeline/_fastdecode.c). It is optional:
where no C compiler is available the install still succeeds and the worker decodes with msgspec,
with the same results (``make test`` requires it: tests/pipeline/test_events.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline._fastdecode", ["pipeline/_fastdecode.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
