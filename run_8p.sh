#!/usr/bin/env bash
# Several devices through torchrun.  bash run_8p.sh [full|perf] [extra train.py args]
#   full  the seed's recipe: R50 from scratch, 8 devices x 8 images, lr 0.2, 40k iterations, AMP O1
#   perf  its 400-iteration throughput run, no validation
# DEPTH=18 switches to the R18 real-time recipe (16 images in all, lr 0.025, 160k iterations).
# NPROC (devices per machine, default 8), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several machines: run
# the same command on each. DIST_BACKEND (nccl/hccl/gloo) passes through. Re-running resumes from WORK_DIR.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
shift || true
DEPTH=${DEPTH:-50}
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
DATA_ROOT=${DATA_ROOT:-data/cityscapes}
DEVICES=$((NPROC * NNODES))

if [ "$DEPTH" = 18 ]; then
  RECIPE=(--depth 18 --batch-size $((16 / DEVICES > 2 ? 16 / DEVICES : 2)) --lr 0.025 --iters 160000 --val-interval 16000 --ckpt-interval 16000)
else
  RECIPE=(--depth "$DEPTH" --batch-size 8 --lr "$(python -c "print(0.025 * $DEVICES)")" --iters 40000)
fi
case "$MODE" in
  full) ;;
  perf) RECIPE+=(--iters 400 --no-validate --ckpt-interval 400) ;;
  *) echo "usage: bash run_8p.sh [full|perf] [extra train.py args]" >&2; exit 2 ;;
esac
WORK_DIR=${WORK_DIR:-work_dirs/bisenetv1_r${DEPTH}_${MODE}_${DEVICES}p}
python -m torch.distributed.run --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  train.py --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" "${RECIPE[@]}" --amp O1 --resume "$@"
