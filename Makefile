# ctrstream: `make demo` and `make test` work on a fresh machine (they build .venv themselves).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest

.PHONY: help demo test test-fast test-interpret test-gpu lint typecheck bench protos clean

help:            ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml setup.py pipeline/_fastdecode.c pipeline/_kafkarecords.c pipeline/_joincore.c pipeline/_storecore.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build; a looser pin pulls several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,redis,confluent]'
	touch $(STAMP)

venv: $(STAMP)   ## create .venv and install everything

demo: $(STAMP)   ## run the whole pipeline end to end on embedded defaults
	$(BIN)/ctrstream demo

test: $(STAMP) lint typecheck  ## lint, strict type check, then the whole suite (slow chaos and end-to-end included)
	bash infra/ensure-redis.sh
	REQUIRE_REDIS=1 $(PYTEST) -q -p no:cacheprovider --timeout=900

test-fast: $(STAMP)  ## quick iteration: everything but slow-marked tests
	bash infra/ensure-redis.sh
	REQUIRE_REDIS=1 $(PYTEST) -q -m "not slow" -x --timeout=300

test-interpret: $(STAMP)  ## Triton parity tests on CPU under the interpreter
	TRITON_INTERPRET=1 REQUIRE_TRITON=1 $(PYTEST) -q -m interpret tests/triton_kernels

test-gpu: $(STAMP)  ## everything on a CUDA machine, kernels compiled
	REQUIRE_TRITON=1 $(PYTEST) -q -m "gpu or interpret" tests/triton_kernels

lint: $(STAMP)   ## ruff
	$(BIN)/ruff check pipeline models triton_kernels serving tests benchmarks

typecheck: $(STAMP)  ## mypy --strict over the source packages (settings in pyproject.toml)
	$(BIN)/mypy

bench: $(STAMP)  ## all benchmarks, JSON lines on stdout
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

protos: $(STAMP) ## regenerate gRPC stubs from serving/proto/scorer.proto
	$(BIN)/python -m grpc_tools.protoc -Iserving/proto=serving/proto --python_out=. --pyi_out=. --grpc_python_out=. serving/proto/scorer.proto

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache
