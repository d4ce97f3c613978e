#!/usr/bin/env bash
# One call on a lent GPU machine: environment, GPU parity tests, kernel benchmarks.
# Usage (repo root, on the GPU machine): OUT=/some/dir benchmarks/kernels/gpu_session.sh [tests|bench|all] [extra bench args]
# Writes $OUT/env.txt, $OUT/pytest.txt, $OUT/kernels.jsonl. The GPU machine's image has torch and
# triton but not this project's service dependencies, so pytest stops conftest lookup at the kernel
# tests (--confcutdir) and the kernels are imported from the source tree.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" REQUIRE_TRITON=1 TRITON_INTERPRET=0
PY=${PY:-python3}
what=${1:-all}; shift || true
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee -a "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider --confcutdir=tests/triton_kernels \
    -m "gpu or interpret" tests/triton_kernels ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.txt" | tail -25
fi
if [[ $what == bench || $what == all ]]; then
  $PY benchmarks/kernels/bench_bandwidth.py | tee -a "$OUT/kernels.jsonl"
  for op in ${OPS:-sdim_hash sdim_bucket_sums sdim_gather dare_search target_attention}; do
    for mode in ${MODES:---fwd-only fwd+bwd}; do
      m=$mode; [[ $m == fwd+bwd ]] && m=""
      [[ $op == sdim_hash && -z $m ]] && continue  # integer output: no backward
      timeout "${BENCH_TIMEOUT:-120}" $PY benchmarks/kernels/bench_$op.py $m "$@" >>"$OUT/kernels.jsonl" \
        2>>"$OUT/bench.err" || echo "{\"op\": \"$op\", \"mode\": \"$mode\", \"error\": \"exit $? (see bench.err)\"}" >>"$OUT/kernels.jsonl"
    done
  done
  $PY - "$OUT/kernels.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r or "skipped" in r:
        print(r); continue
    if r["op"] == "d2d_copy":
        print(f"d2d_copy {r['gpu']} {r['gbps']} GB/s"); continue
    print(f"{r['op']:17s} {r['mode']:8s} {r['dtype']:5s} B={r['B']:<6} U={r['U']:<5} L={r['L']:<7} d={r['d']:<4}"
          f" {r['provider']:7s} {r['ms_p50']:9.4f} ms {r['gbps']:9.1f} GB/s x{r['speedup_vs_torch']}")
PYEOF
fi
