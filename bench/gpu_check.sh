#!/usr/bin/env bash
# GPU check of the Triton backend (issue 6 prep). On a bare GPU machine with PyTorch + Triton and no
# network, from the repository root:
#     bash bench/gpu_check.sh            # everything lands in $OUT (or bench/results/gpu_check-<time>)
# Steps: make the package importable, GPU tests (gpu marker, incl. slow N=65536 ones unless
# QUICK=1), the sm90 compile test, the loss benchmark sweep, its plot, the training-step benchmark
# (bench_train.py) and the loaders' CPU cost per image; a log of all of it.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -Is) $(git rev-parse --short HEAD 2>/dev/null) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

# importable without network: editable install without dependencies, else PYTHONPATH
if ! $PY -c "import acl_kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import acl_kernels, sys; print('acl_kernels from', acl_kernels.__file__)" || exit 1
# The device machines have no network and may lack pytest: prepare pure-Python wheels beforehand with
#     pip download pytest -d .wheels     (git-ignored; pass .wheels in the device tool's carry list)
if ! $PY -c "import pytest" 2>/dev/null && [ -d "${WHEELS:-.wheels}" ]; then
    $PY -m pip install -q --no-index --find-links "${WHEELS:-.wheels}" pytest || true
fi
$PY -c "import pytest" 2>/dev/null || echo "pytest missing: tests skipped"

status=0
if $PY -c "import pytest" 2>/dev/null; then
    MARK="gpu"
    [ "${QUICK:-0}" = "1" ] && MARK="gpu and not slow"
    echo "== tests: -m '$MARK'"
    $PY -m pytest -q -p no:cacheprovider -m "$MARK" tests/test_triton_gpu.py --junitxml="$OUT/gpu_tests.xml" || status=1
    echo "== tests: interpreter + sm90 compile"
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_interpret.py tests/test_triton_sm90.py || status=1
fi

echo "== benchmark"
CSV=$OUT/loss.csv
if [ "${QUICK:-0}" = "1" ]; then
    $PY bench/bench_loss.py --csv "$CSV" --sizes 1024 4096 16384 65536 --dims 128 --views 2 --dtypes bf16 || status=1
else
    # main sweep: every loss and impl over N at d=128, V=2, bf16; then the other axes at fewer N
    $PY bench/bench_loss.py --csv "$CSV" --dims 128 --views 2 --dtypes bf16 || status=1
    $PY bench/bench_loss.py --csv "$CSV" --sizes 4096 16384 65536 --dims 512 --views 2 --dtypes bf16 || status=1
    $PY bench/bench_loss.py --csv "$CSV" --sizes 4096 16384 65536 --dims 128 --views 8 --dtypes bf16 || status=1
    $PY bench/bench_loss.py --csv "$CSV" --sizes 4096 16384 65536 --dims 128 --views 2 --dtypes fp32 || status=1
fi
$PY bench/plot_loss.py --csv "$CSV" || echo "plot failed (matplotlib missing?)"

echo "== training steps: ResNet-50, ImageNet-LT recipe, V = 2 and 4, both loaders (DALI: GPU decode)"
TCSV=$OUT/train.csv
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NPROC=""
[ "$NGPU" -gt 1 ] && NPROC="--nproc $NGPU"   # 1 process first, then every GPU: scaling efficiency
$PY bench/bench_train.py --config imagenet_lt_r50 --synthetic --n-views 2 4 --data-loader dali pytorch \
    --csv "$TCSV" $NPROC || status=1
$PY bench/plot_train.py --csv "$TCSV" || echo "plot failed (matplotlib missing?)"
echo "== loader CPU cost per image with GPU decode + augmentation (DALI mixed) vs CPU"
$PY bench/bench_loader.py --device cuda --loaders dali --repeats 2 --csv "$OUT/loader.csv" || status=1
$PY bench/bench_loader.py --device cpu --repeats 2 --csv "$OUT/loader.csv" || status=1
echo "== done, status $status; results in $OUT"
exit $status
