#!/usr/bin/env bash
# One-shot verification on a lent GPU machine (preinstalled torch/triton, no network):
# the test suite with compiled kernels, the tuning run, the benchmarks and one training epoch.
# Usage: benchmarks/gpu_verify.sh [OUT_DIR]    (default docs/gpu); every step logs to OUT_DIR
# and a failing step does not stop the next ones.  Pass MNIST idx files in data/MNIST/raw for
# the training step (the machine cannot download them).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-docs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

step() {  # step NAME COMMAND...: run, log, record the exit status
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}

{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

step install $PY -m pip install --no-deps --no-build-isolation -e .
step compile-check $PY -m capstriton.kernels.compile_check
# data provisioning needs the network and the compile check already ran above
skip=(--ignore=tests/test_data.py --ignore=tests/test_compile_check.py)
[ -d data/MNIST/raw ] || skip+=(--ignore=tests/test_training.py)
step tests env CAPSTRITON_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider "${skip[@]}"
step tune $PY -m capstriton.tune --batch-sizes 32 128 512
step bench $PY benchmarks/bench_digitcaps.py --out "$OUT/benchmarks"
if [ -d data/MNIST/raw ]; then
    step train-epoch $PY examples/train_mnist.py --epochs 1 --no-download --data-dir data --out-dir "$OUT/train" --no-progress
fi
exit $status
