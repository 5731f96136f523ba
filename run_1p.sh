#!/usr/bin/env bash
# One device.  bash run_1p.sh [full|perf|demo|bench|bench-infer] [extra train.py / benchmark.py args]
#   full  Ascend ModelZoo's recipe scaled to one device: R50 from scratch, 8 images, lr 0.025, 40k iterations, AMP O1
#   perf  Ascend ModelZoo's throughput run: the same for 400 iterations, no validation
#   demo  offline: synthetic Cityscapes, a few minutes of R18 on whatever device exists, evaluate, predictions
#   bench training speed of the R50 and R18 recipes on this device, end to end, and a torchrun check (benchmark.py;
#         BENCH_SMALL=1 for small sizes, --variants all for every speed option); ends with one JSON line
#   bench-infer  inference: evaluate.py --benchmark for R18/R50 at 1024x2048 and 512x1024 (batch 1 and the best
#         batch), the fast path's class maps against eager fp32 on a trained synthetic R18, a timed val pass
#         split into data and model time; BENCH_SMALL=1 for small sizes; ends with one JSON line
# DEPTH=18 switches full/perf to the R18 real-time recipe (mmseg: 16 images, lr 0.025, 160k iterations).
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
    python synthetic.py cityscapes "$DATA_ROOT" --train 48 --val 12 --height 128 --width 256
    python convert_labels.py "$DATA_ROOT" --nproc 2
  fi
  # sized for a 2-core AVX2 CPU, which trains in fp32 (README: which precision runs where)
  python train.py --device "$DEVICE" --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" --depth 18 --batch-size 8 --crop 128x256 \
    --scale-range 0.75,1.5 --iters 200 --lr 0.05 --warmup-iters 20 --val-interval 100 --ckpt-interval 100 \
    --log-interval 10 --workers 1 --resume "$@" | tee "$WORK_DIR/train.out"
  rm -rf "$WORK_DIR/predictions"  # the demo's own previous predictions: evaluate.py never overwrites a file
  python evaluate.py --device "$DEVICE" --ckpt "$WORK_DIR/latest.pth" --data-root "$DATA_ROOT" --out-dir "$WORK_DIR/predictions" --format color | tee "$WORK_DIR/eval.out"
  python evaluate.py --device "$DEVICE" --benchmark --ckpt "$WORK_DIR/latest.pth" --size 128x256 --runs 10 | tee "$WORK_DIR/bench.out"
  python - "$WORK_DIR" <<'PY'
import json, sys
last = lambda name: json.loads(open(f"{sys.argv[1]}/{name}.out").read().strip().splitlines()[-1])
train, val, bench = last("train"), last("eval"), last("bench")
print(f"demo: val mIoU {val['mIoU']:.2f} ({val['mode']}), training {train['train_fps']} img/s ({train['precision']}), inference {bench['fps']} FPS "
      f"at {bench['size']} ({bench['precision']}, {bench['device']}); colorized predictions in {sys.argv[1]}/predictions/")
print(json.dumps({"mIoU": val["mIoU"], "train_fps": train["train_fps"], "inference_fps": bench["fps"], "precision": train["precision"], "checkpoint": train["checkpoint"]}))
PY
  exit 0
fi

if [ "$MODE" = bench ]; then
  exec python benchmark.py "$@"
fi
if [ "$MODE" = bench-infer ]; then
  exec python benchmark_inference.py "$@"
fi

# train.py's defaults are the R50 recipe on one device (8 images, lr 0.2 x 8/64 = 0.025, 40k iterations, O1);
# a recipe passes only what differs from them.
if [ "$DEPTH" = 18 ]; then
  RECIPE=(--depth 18 --batch-size 16 --iters 160000 --val-interval 16000 --ckpt-interval 16000)  # lr 0.025 for 16 images
else
  RECIPE=(--depth "$DEPTH")
fi
case "$MODE" in
  full) ;;
  perf) RECIPE+=(--iters 400 --no-validate --ckpt-interval 400) ;;
  *) echo "usage: bash run_1p.sh [full|perf|demo|bench|bench-infer] [extra train.py or benchmark.py args]" >&2; exit 2 ;;
esac
WORK_DIR=${WORK_DIR:-work_dirs/bisenetv1_r${DEPTH}_${MODE}_1p}
COMMAND=(python train.py --device "$DEVICE" --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" "${RECIPE[@]}" --resume "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "${COMMAND[*]}"
  exit 0
fi
"${COMMAND[@]}"
