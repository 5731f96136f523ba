#!/usr/bin/env bash
# Several devices through torchrun.  bash run_8p.sh [full|perf] [extra train.py args]
#   full  Ascend ModelZoo's recipe: R50 from scratch, 8 devices x 8 images, lr 0.2, 40k iterations, AMP O1
#   perf  its 400-iteration throughput run, no validation
# DEPTH=18 switches to the R18 real-time recipe (16 images in all, lr 0.025, 160k iterations).
# NPROC (devices per machine, default 8), NNODES (machines, default 1), MASTER_ADDR:MASTER_PORT (where the
# rendezvous runs, default 127.0.0.1:29500): run the same command on every machine, with WORK_DIR on storage they
# share. DIST_BACKEND (nccl/hccl/gloo) and DIST_TIMEOUT (seconds) pass through to train.py.
# A lost process (crash, kill -9, OOM) restarts the whole group from the newest checkpoint, up to MAX_RESTARTS
# (default 3) times. RDZV_BACKEND/RDZV_ENDPOINT (default c10d on MASTER_ADDR:MASTER_PORT; etcd-v2 on an etcd
# server survives the loss of the MASTER_ADDR machine). Re-running the command resumes from WORK_DIR too.
# DEVICE (npu, cuda or cpu) overrides the device; by default an Ascend NPU, else a CUDA GPU, else the CPU.
# HCCL_CONNECT_TIMEOUT (Ascend's link setup wait) follows DIST_TIMEOUT unless set, within HCCL's 120-7200 s.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-full}
shift || true
DEPTH=${DEPTH:-50}
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
DATA_ROOT=${DATA_ROOT:-data/cityscapes}
DEVICES=$((NPROC * NNODES))
DEVICE=${DEVICE:-$(python -c 'import device; print(device.choose_device("auto")[0])' | tail -n 1)}
TIMEOUT=${DIST_TIMEOUT:-1800}
TIMEOUT=${TIMEOUT%%.*}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-$((TIMEOUT < 120 ? 120 : TIMEOUT > 7200 ? 7200 : TIMEOUT))}

# train.py's defaults are the R50 recipe on one device (8 images, lr 0.025, 40k iterations, O1); a recipe passes
# only what differs from them.
if [ "$DEPTH" = 18 ]; then
  # mmseg's R18 recipe: 16 images in all at lr 0.025 (the default), so 16 / DEVICES per device, at least 2 each
  # (BatchNorm on the pooled attention maps): 1, 2, 4 or 8 devices
  if [ $((16 % DEVICES)) != 0 ] || [ "$DEVICES" -gt 8 ]; then
    echo "error: DEPTH=18 trains 16 images in all; $DEVICES devices do not split them into batches of 2 or more: use 1, 2, 4 or 8 devices" >&2
    exit 2
  fi
  RECIPE=(--depth 18 --batch-size $((16 / DEVICES)) --iters 160000 --val-interval 16000 --ckpt-interval 16000)
else
  # 8 images per device (the default) and lr 0.025 per 8 images, scaled linearly: 8 devices x 8 = 64 images at 0.2
  RECIPE=(--depth "$DEPTH" --lr "$(python -c "print(round(0.025 * $DEVICES, 6))")")
fi
case "$MODE" in
  full) ;;
  perf) RECIPE+=(--iters 400 --no-validate --ckpt-interval 400) ;;
  *) echo "usage: bash run_8p.sh [full|perf] [extra train.py args]" >&2; exit 2 ;;
esac
WORK_DIR=${WORK_DIR:-work_dirs/bisenetv1_r${DEPTH}_${MODE}_${DEVICES}p}
# A fresh store for each restart: with the shared one, restarted gloo ranks can read the dead ranks' addresses and
# wait forever (seen with torch 2.13 in tests/test_safety.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
COMMAND=(python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}"
  --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}"
  --rdzv-id "${RUN_ID:-$(basename "$WORK_DIR")}"
  train.py --device "$DEVICE" --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" "${RECIPE[@]}" --resume "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT ${COMMAND[*]}"
  exit 0
fi
"${COMMAND[@]}"
