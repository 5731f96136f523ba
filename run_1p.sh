#!/usr/bin/env bash
# One device.  bash run_1p.sh [full|perf|demo|bench|bench-infer] [extra train.py / tools/benchmark*.py args]
#   full  train.py --recipe ascend_r50: Ascend ModelZoo's recipe on one device (R50 from scratch, AMP O1)
#   perf  train.py --recipe ascend_r50_perf: Ascend ModelZoo's 400-iteration throughput run, no validation
#   demo  offline: synthetic Cityscapes, train.py --recipe demo (R18, a few minutes on whatever device exists),
#         evaluate, predictions, inference speed
#   bench training speed of the R50 and R18 recipes on this device, end to end, and a torchrun check
#         (tools/benchmark.py; BENCH_SMALL=1 for small sizes, --variants all for every speed option); one JSON line
#   bench-infer  inference (tools/benchmark_inference.py --suite): R18/R50 at 1024x2048 and 512x1024 (batch 1 and the
#         best batch), the fast path's class maps against eager fp32 on a trained synthetic R18, a timed val pass
#         split into data and model time; BENCH_SMALL=1 for small sizes; ends with one JSON line
# DEPTH=18 switches full/perf to the R18 real-time recipe (train.py --recipe mmseg_r18 / mmseg_r18_perf).
# The recipes' numbers live in train.py's RECIPES; DRY_RUN=1 prints the command and the settings it trains with.
# DATA_ROOT (default data/cityscapes) and WORK_DIR override the paths. Re-running resumes from WORK_DIR.
# DEVICE (npu, cuda or cpu) overrides the device; by default an Ascend NPU, else a CUDA GPU, else the CPU.
# DRY_RUN=1 prints the full/perf training command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
shift || true
DEPTH=${DEPTH:-50}
DATA_ROOT=${DATA_ROOT:-data/cityscapes}
DEVICE=${DEVICE:-$(python -c 'import device; print(device.choose_device("auto")[0])' | tail -n 1)}

if [ "$MODE" = demo ]; then
  DATA_ROOT=${DATA_ROOT_DEMO:-data/synthetic}
  WORK_DIR=${WORK_DIR:-work_dirs/demo}
  mkdir -p "$WORK_DIR"
  if [ ! -f "$DATA_ROOT/val.txt" ]; then
    python tools/synthetic.py cityscapes "$DATA_ROOT" --train 48 --val 12 --height 128 --width 256
    python convert_labels.py "$DATA_ROOT" --nproc 2
  fi
  python train.py --device "$DEVICE" --recipe demo --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" --log-interval 10 --workers 1 \
    --resume "$@" | tee -a "$WORK_DIR/train.out"
  PREDICTIONS="$WORK_DIR/predictions"  # a rerun writes beside an earlier run's: none is ever replaced
  for n in $(seq 2 1000); do [ -e "$PREDICTIONS" ] || break; PREDICTIONS="$WORK_DIR/predictions_$n"; done
  python evaluate.py --device "$DEVICE" --ckpt "$WORK_DIR/latest.pth" --data-root "$DATA_ROOT" --out-dir "$PREDICTIONS" --format color | tee -a "$WORK_DIR/eval.out"
  python tools/benchmark_inference.py --device "$DEVICE" --ckpt "$WORK_DIR/latest.pth" --size 128x256 --runs 10 | tee -a "$WORK_DIR/bench.out"
  python - "$WORK_DIR" "$PREDICTIONS" <<'PY'
import json, sys
last = lambda name: json.loads(open(f"{sys.argv[1]}/{name}.out").read().strip().splitlines()[-1])
train, val, bench = last("train"), last("eval"), last("bench")
trained = f"training {train['train_fps']} img/s ({train['precision']})" if train["train_fps"] else "nothing left to train (the run was complete)"
print(f"demo: val mIoU {val['mIoU']:.2f} ({val['mode']}), {trained}, inference {bench['fps']} FPS "
      f"at {bench['size']} ({bench['precision']}, {bench['device']}); colorized predictions in {sys.argv[2]}/")
print(json.dumps({"mIoU": val["mIoU"], "train_fps": train["train_fps"], "inference_fps": bench["fps"], "precision": train["precision"], "checkpoint": train["checkpoint"]}))
PY
  exit 0
fi

if [ "$MODE" = bench ]; then
  exec python tools/benchmark.py "$@"
fi
if [ "$MODE" = bench-infer ]; then
  exec python tools/benchmark_inference.py --suite "$@"
fi

case "$DEPTH" in
  18) RECIPE=mmseg_r18 ;;
  50) RECIPE=ascend_r50 ;;
  *) echo "error: DEPTH=$DEPTH: the recipes are for DEPTH=18 and DEPTH=50" >&2; exit 2 ;;
esac
case "$MODE" in
  full) ;;
  perf) RECIPE+=_perf ;;
  *) echo "usage: bash run_1p.sh [full|perf|demo|bench|bench-infer] [extra train.py or tools/benchmark*.py args]" >&2; exit 2 ;;
esac
WORK_DIR=${WORK_DIR:-work_dirs/bisenetv1_r${DEPTH}_${MODE}_1p}
COMMAND=(python train.py --device "$DEVICE" --recipe "$RECIPE" --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" --resume "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "${COMMAND[*]}"
  "${COMMAND[@]}" --print-recipe
  exit 0
fi
exec "${COMMAND[@]}"
