#!/usr/bin/env bash
# GPU check for medeman, one script for a CUDA machine (about 5 minutes; it stops itself at 8):
#   1. installs what is missing (medeman and its test extras into the current Python, if not importable),
#   2. runs the test suite's GPU-marked tests (pytest -m gpu: one-GPU SyncBatchNorm decision,
#      32 / bf16-mixed / 16-mixed training steps, channels_last, `medeman infer --device cuda`),
#   3. bench_train_step.py and bench_infer.py at GPU size (configs/msd_heart.yaml: UNet
#      [16..256], 112x112x80 patches, batch 2 + 2, bf16), torch.compile measured beside eager,
#   4. writes each step's output as a table into the folder given as $1, or $OUT, or ./gpu_check.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#   bash benchmarks/gpu_check.sh --smoke      # the same steps on the CPU at tiny sizes (the test suite runs this)
#
# Every step runs even when an earlier one fails; the exit code is 1 if any failed. The summary
# (summary.md) names the card, the driver, torch and CUDA, and each step's status and seconds.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu_check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEADLINE=$(( $(date +%s) + 480 ))  # 8 minutes for everything
FAILED=0
SUMMARY="$OUT_DIR/summary.md"

step() {  # step NAME SECONDS_CAP COMMAND...: run with a time cap, keep its output as NAME.txt
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -le 5 ]; then
    echo "| $name | not run: out of the 8 minutes | |" >> "$SUMMARY"; FAILED=1; return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local start=$(date +%s)
  echo "== $name (at most ${cap} s)"
  timeout "$cap" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  tail -n 25 "$OUT_DIR/$name.txt"
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ]; then status="timed out after ${cap} s"; FAILED=1; else status="failed (exit $rc)"; FAILED=1; fi
  echo "| $name | $status | $took |" >> "$SUMMARY"
}

# 1. what is missing
if ! "$PY" -c "import medeman, pytest" 2>/dev/null; then
  echo "== installing medeman with its test extras into $PY"
  "$PY" -m pip install -q -e ".[dev]" || { echo "error: pip install failed" >&2; exit 2; }
fi
if [ $SMOKE -eq 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); use --smoke for the CPU dry run" >&2
  exit 2
fi

{
  echo "# medeman GPU check"
  echo
  "$PY" - <<'EOF'
import platform, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {platform.node()}")
else:
    print(f"no GPU (smoke run on the CPU); torch {torch.__version__}; {platform.node()}")
EOF
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

# The same commands in both modes, so the smoke run checks every flag the GPU run passes; --smoke
# makes each benchmark tiny (its own sizes win over the ones given here) and runs it on the CPU.
if [ $SMOKE -eq 1 ]; then
  DEVICE=cpu; COMPILE=false; SMOKE_FLAG=(--smoke); TESTS=tests/test_gpu.py; ALL=a; FLOOR=a
else
  DEVICE=cuda; COMPILE=true; SMOKE_FLAG=(); TESTS=tests; ALL=abc; FLOOR=ab
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
fi
step gpu_tests 150 "$PY" -m pytest -q -m gpu "$TESTS"
# MSD heart recipe: 112x112x80 patches, UNet [16, 32, 64, 128, 256], 2 labeled + 2 unlabeled, bf16
HEART=(--device "$DEVICE" --patch 112 112 80 --batch 2 --threads 4 --labeled 6 --unlabeled 6
       --set "model.channels=[16,32,64,128,256]" --set data.num_workers=12 --set data.cache=memory)
step bench_train_step 170 "$PY" benchmarks/bench_train_step.py "${HEART[@]}" --steps 20 --warmup 5 \
  --precision 32 bf16 --variants "$ALL" "${SMOKE_FLAG[@]}"
step bench_train_step_compile 130 "$PY" benchmarks/bench_train_step.py "${HEART[@]}" --steps 20 --warmup 10 \
  --precision bf16 --variants "$FLOOR" --set "train.compile=$COMPILE" "${SMOKE_FLAG[@]}"
step bench_infer 100 "$PY" benchmarks/bench_infer.py --device "$DEVICE" --size 256 --scan-spacing 0.7 0.7 1.4 \
  --model-spacing 1.25 1.25 1.37 --config configs/msd_heart.yaml --set data.modality=CT --repeats 5 --threads 4 \
  --tta both --cases 2 --precision bf16 "${SMOKE_FLAG[@]}"

echo
cat "$SUMMARY"
echo "tables: $OUT_DIR/"
exit $FAILED
