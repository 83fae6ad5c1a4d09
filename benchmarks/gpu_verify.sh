#!/usr/bin/env bash
# GPU verification on a lent machine (torch + triton preinstalled, no network).
#
#   bash benchmarks/gpu_verify.sh --quick      # fits 8 minutes on an H100: the device tool's run
#   bash benchmarks/gpu_verify.sh              # full: every step at full size, no overall budget
#   bash benchmarks/gpu_verify.sh --quick --dry-run    # print the plan, run nothing
#   options: --results DIR (default docs/gpu/<card>-<date>), --budget SECONDS (quick: 510)
#
# The steps run in the order of PLAN below: what the GPU run measures first comes first
# (correctness, then the DigitCaps benchmark, then training speed, then the rest).  Every step is
# time-boxed with `timeout`; with --quick each box is also cut to what is left of the overall
# budget, and a step that would get less than MIN_STEP seconds is skipped, so the script always
# finishes in budget.  A failing step does not stop the next.  After every step the summary
# (summary.md, summary.tsv) is rewritten, so it exists whatever happens; when the device tool's
# $OUT is set the results directory is copied there too.  Bring the data along with
# `make gpu-bundle` (data/gpu-bundle: MNIST idx files gzipped, pure-Python wheels); see
# docs/gpu/README.md for the exact device-tool call.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
MODE=full DRY=0 RESULTS="" BUDGET=""
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --dry-run) DRY=1 ;;
        --results) RESULTS=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        --setup) MODE=setup ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
BUNDLE=data/gpu-bundle
MIN_STEP=${GPU_VERIFY_MIN_STEP:-20}
WORKERS=${GPU_VERIFY_WORKERS:-12}

setup() {  # runs as a step: data in place, missing pure-Python packages from the bundle, capstriton importable
    mkdir -p data/MNIST/raw
    for f in "$BUNDLE"/MNIST/raw/*.gz; do
        [ -e "$f" ] && cp -n "$f" data/MNIST/raw/
    done
    ls -la data/MNIST/raw
    local missing=() spec
    for spec in pytest:pytest xdist:pytest-xdist einops:einops expecttest:expecttest; do
        $PY -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec##*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing from $BUNDLE/wheels: ${missing[*]}"
        $PY -m pip install --no-index --find-links "$BUNDLE/wheels" "${missing[@]}"
    fi
    $PY -c "import capstriton.kernels" 2>/dev/null || \
        $PY -m pip install --no-deps --no-build-isolation -e . || true
    $PY -c "import capstriton.kernels, torch, triton; print('capstriton', capstriton.__file__, '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"
}
if [ "$MODE" = setup ]; then
    setup
    exit $?
fi

link_package() {  # fallback when pip cannot install: capstriton/kernels -> ../kernels, repo on PYTHONPATH
    [ -e capstriton/kernels ] || ln -s ../kernels capstriton/kernels
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "capstriton importable through the link capstriton/kernels -> ../kernels (pip install -e failed)"
}

# ---------------------------------------------------------------------------------------- the plan
# name | quick box (s) | full box (s) | command (quick) | command (full)     -- in this order
# (@R stands for the results directory)
XDIST=""
[ "$DRY" = 1 ] || ! $PY -c "import xdist" 2>/dev/null || XDIST="-n $WORKERS"
[ "$DRY" = 1 ] && XDIST="-n $WORKERS (if pytest-xdist is installed)"
PLAN=(
"setup|60|600|bash benchmarks/gpu_verify.sh --setup|bash benchmarks/gpu_verify.sh --setup"
"tests|180|2400|CAPSTRITON_TEST_DEVICE=cuda $PY -m pytest -q -rfE -p no:cacheprovider $XDIST -m 'not slow' --ignore=tests/test_data.py --ignore=tests/test_compile_check.py --junitxml=@R/tests.xml|CAPSTRITON_TEST_DEVICE=cuda $PY -m pytest -q -rfE -p no:cacheprovider $XDIST --ignore=tests/test_data.py --ignore=tests/test_compile_check.py --junitxml=@R/tests.xml"
"bench-paper|100|900|$PY benchmarks/bench_digitcaps.py --routings dynamic --batch-sizes 32 128 512 --large-batch 0 --model-batch 0 --providers fused eager compiled --warmup-ms 10 --rep-ms 40 --out @R/bench-paper|$PY benchmarks/bench_digitcaps.py --batch-sizes 32 128 512 --large-batch 0 --model-batch 0 --out @R/bench-paper"
"bench-em|60|1800|$PY benchmarks/bench_em.py --quick --time-budget 30 --out @R/bench-em|$PY benchmarks/bench_em.py --compiled --out @R/bench-em"
"host-overhead|25|120|$PY benchmarks/bench_digitcaps.py --host-overhead --host-reps 100 --out @R/host-overhead|$PY benchmarks/bench_digitcaps.py --host-overhead --out @R/host-overhead"
"train-epoch|130|1200|$PY examples/train_mnist.py --epochs 1 --time-budget 80 --no-download --data-dir $BUNDLE --out-dir @R/train --no-progress|$PY examples/train_mnist.py --epochs 1 --no-download --data-dir $BUNDLE --out-dir @R/train --no-progress"
"bench-attention|60|600|$PY benchmarks/bench_digitcaps.py --routings self-attention inverted-attention --batch-sizes 128 --large-batch 0 --model-batch 0 --providers fused eager compiled --warmup-ms 10 --rep-ms 40 --out @R/bench-attention|$PY benchmarks/bench_digitcaps.py --routings self-attention inverted-attention --batch-sizes 32 128 512 --large-batch 0 --model-batch 0 --out @R/bench-attention"
"tune|60|2400|$PY -m capstriton.tune --batch-sizes 128 --dtypes float32 --output @R/autotune.json|$PY -m capstriton.tune --batch-sizes 32 128 512 --output @R/autotune.json"
"bench-full|120|1800|$PY benchmarks/bench_digitcaps.py --batch-sizes 128 --warmup-ms 10 --rep-ms 40 --out @R/bench-full|$PY benchmarks/bench_digitcaps.py --out @R/bench-full"
"compile-check|60|900|$PY -m capstriton.kernels.compile_check --json @R/compile_check.json --summary|$PY -m capstriton.kernels.compile_check --json @R/compile_check.json"
)
if [ "$MODE" = quick ]; then BUDGET=${BUDGET:-510}; fi

# -------------------------------------------------------------------------------- where results go
if command -v nvidia-smi >/dev/null 2>&1; then
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
CARD=${CARD:-no-gpu}
SLUG=$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
RESULTS=${RESULTS:-docs/gpu/$SLUG-$(date -u +%Y-%m-%d)}

pick() {  # pick PLAN_ENTRY: sets name, box and cmd for this mode
    local qbox fbox qcmd fcmd
    IFS='|' read -r name qbox fbox qcmd fcmd <<< "$1"
    if [ "$MODE" = quick ]; then box=$qbox cmd=$qcmd; else box=$fbox cmd=$fcmd; fi
    cmd=${cmd//@R/$RESULTS}
}

if [ "$DRY" = 1 ]; then
    echo "gpu_verify ($MODE): results in $RESULTS; overall budget: ${BUDGET:-none} s; steps in order:"
    n=0
    for entry in "${PLAN[@]}"; do
        pick "$entry"
        n=$((n + 1))
        printf '%d. %-14s box %5s s  %s\n' "$n" "$name" "$box" "$cmd"
    done
    exit 0
fi

mkdir -p "$RESULTS"
START=$SECONDS
ROWS=()
status=0

write_summary() {
    {
        echo "# GPU verification ($MODE), $(date -u +'%Y-%m-%d %H:%M UTC')"
        echo
        sed 's/^/- /' "$RESULTS/environment.txt"
        echo "- overall budget: ${BUDGET:-none} s; elapsed: $((SECONDS - START)) s"
        echo
        echo "| # | step | result | seconds | box (s) | log |"
        echo "|---|---|---|---|---|---|"
        local i=0 row
        for row in "${ROWS[@]}"; do
            i=$((i + 1))
            IFS='|' read -r name result secs box log <<< "$row"
            echo "| $i | $name | $result | $secs | $box | $log |"
        done
    } > "$RESULTS/summary.md"
    printf '%s\n' "${ROWS[@]}" > "$RESULTS/summary.tsv"
    if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then  # the device tool returns what lies under $OUT
        mkdir -p "$OUT/$RESULTS" && cp -r "$RESULTS/." "$OUT/$RESULTS/"
    fi
}
trap write_summary EXIT

{
    date -u +"date: %Y-%m-%d %H:%M UTC"
    echo "card: $CARD"
    nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/driver, memory: /'
    echo "cpu cores: $(nproc 2>/dev/null)"
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (working tree modified)')"
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

n=0
for entry in "${PLAN[@]}"; do
    pick "$entry"
    n=$((n + 1))
    log=$(printf '%02d-%s.log' "$n" "$name")
    if [ -n "$BUDGET" ]; then
        left=$((BUDGET - (SECONDS - START)))
        [ "$box" -gt "$left" ] && box=$left
        if [ "$box" -lt "$MIN_STEP" ]; then
            echo "== $name: skipped (${left} s of the budget left)"
            ROWS+=("$name|skipped (budget)|0|$box|")
            write_summary
            continue
        fi
    fi
    echo "== $name (box $box s): $cmd"
    t0=$SECONDS
    timeout --kill-after=5 "$box" bash -c "$cmd" > "$RESULTS/$log" 2>&1
    rc=$?
    secs=$((SECONDS - t0))
    case $rc in
        0) result=ok ;;
        124|137) result="TIMEOUT"; status=1 ;;
        *) result="FAILED (exit $rc)"; status=1 ;;
    esac
    echo "   $result after $secs s"
    ROWS+=("$name|$result|$secs|$box|$log")
    if [ "$name" = setup ] && ! $PY -c "import capstriton.kernels" 2>/dev/null; then
        link_package
    fi
    write_summary
done
echo "summary: $RESULTS/summary.md ($((SECONDS - START)) s)"
exit $status
