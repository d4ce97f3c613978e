"""Only the C extensions; everything else about the package is in pyproject.toml.

``pipeline._fastdecode`` is the worker's decode fast path (pipeline/_fastdecode.c);
``pipeline._kafkarecords`` parses kafka-python's fetched records (pipeline/_kafkarecords.c, used by
pipeline/_kafka_fast.py) and turns confluent-kafka's messages into columns (pipeline/_confluent.py); ``pipeline._joincore`` is the worker's impression/click join loop
(pipeline/_joincore.c, used by pipeline/joins.py); ``pipeline._storecore`` plans the LMDB store's
chunk writes (pipeline/_storecore.c, used by pipeline/state/lmdb.py). All are optional: where no C
compiler is available the install still succeeds, the worker decodes with msgspec, kafka-python
parses its own records, the worker joins in Python and the LMDB store plans its writes in Python,
with the same results (``make test`` requires all four: tests/pipeline/test_events.py,
test_kafka_fast.py, test_joins.py, test_state.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(name, [f"pipeline/{name.split('.')[1]}.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])
                   for name in ("pipeline._fastdecode", "pipeline._kafkarecords", "pipeline._joincore",
                                "pipeline._storecore")])
