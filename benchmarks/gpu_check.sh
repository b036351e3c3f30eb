#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one call (each step has a time limit; 12 minutes at most):
#   1. the tests marked `cuda` (training step, the cache on the device, predict, serve);
#   2. `alnet demo` on the GPU;
#   3. training and inference images/s of alnet's pipeline (uint8 cache on the device, bf16 AMP, channels-last)
#      against a plain ImageFolder + PIL + fp32 pipeline on the same GPU (benchmarks/train.py), at batch 256
#      and at the paper's batch 32, and the paper protocol's wall time on the full C-NMC training set
#      extrapolated from the batch-32 rate.
# Prints one JSON line at the end (also written to $OUT/gpu_check.json when OUT is set); the steps' logs go to
# $OUT (or a temporary folder).
# Usage, from the repository root: benchmarks/gpu_check.sh
#   PYTHON=python3           the interpreter that holds torch with CUDA
#   ALNET_WHEELS=DIR         wheels of dependencies that machine lacks, installed into a private folder first
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1
if [ -n "${ALNET_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/alnet-site \
    "$ALNET_WHEELS"/*.whl >>"$LOG" 2>&1 || echo "warning: installing $ALNET_WHEELS failed (see $LOG)" >&2
  export PYTHONPATH=/tmp/alnet-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND…: run with a time limit, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log" | tee -a "$LOG"
}

: >"$OUT/steps.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
step cuda_tests 240 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
step demo 150 "$PY" -m alnet demo --out "$OUT/demo" --no-progress
step bench_256 180 "$PY" benchmarks/train.py --images 512 --repeat 16 --epochs 3 --batch-size 256 --workers 8
step bench_32 150 "$PY" benchmarks/train.py --images 512 --repeat 4 --epochs 3 --batch-size 32 --workers 8

"$PY" - "$OUT" <<'PY' | tee "$OUT/gpu_check.json"
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = {name: {"exit": int(rc), "seconds": int(s)}
         for name, rc, s in (line.split() for line in (out / "steps.txt").read_text().splitlines())}
report = {"gpu": (out / "gpu.txt").read_text().strip(), "steps": steps}
tests = re.findall(r"(\d+) (passed|failed|skipped|error)", (out / "cuda_tests.log").read_text())
report["cuda_tests"] = {kind: int(n) for n, kind in tests}
metrics = out / "demo" / "run" / "metrics.json"
if metrics.is_file():
    summary = json.loads(metrics.read_text()).get("summary", {})
    report["demo_summary_accuracy"] = summary.get("accuracy")
for batch in (256, 32):
    lines = [l for l in (out / f"bench_{batch}.log").read_text().splitlines() if l.startswith("{")]
    if lines:
        report[f"bench_batch_{batch}"] = json.loads(lines[-1])
# The paper protocol on the full C-NMC training set: 3 folds (3,527 / 3,581 / 3,553 images), 80 % of each
# trains, doubled offline, for 140 epochs at the paper's batch size 32.
rate = report.get("bench_batch_32", {}).get("train_images_per_s")
if rate:
    images = sum(2 * round(0.8 * n) for n in (3527, 3581, 3553)) * 140
    report["paper_protocol_full_data_minutes_estimate"] = round(images / rate / 60, 1)
print(json.dumps(report))
PY
