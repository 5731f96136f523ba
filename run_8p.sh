#!/usr/bin/env bash
# Several devices through torchrun.  bash run_8p.sh [full|perf] [extra train.py args]
#   full  train.py --recipe ascend_r50: Ascend ModelZoo's recipe (R50 from scratch, 8 devices x 8 images, lr 0.2, AMP O1)
#   perf  train.py --recipe ascend_r50_perf: its 400-iteration throughput run, no validation
# DEPTH=18 switches to the R18 real-time recipe (train.py --recipe mmseg_r18: 16 images in all, split across the devices).
# The recipes' numbers, and how each adapts to the device count, live in train.py's RECIPES.
# NPROC (devices per machine, default 8), NNODES (machines, default 1), MASTER_ADDR:MASTER_PORT (where the
# rendezvous runs, default 127.0.0.1:29500): run the same command on every machine, with WORK_DIR on storage they
# share. DIST_BACKEND (nccl/hccl/gloo) and DIST_TIMEOUT (seconds) pass through to train.py.
# A lost process (crash, kill -9, OOM) restarts the whole group from the newest checkpoint, up to MAX_RESTARTS
# (default 3) times. RDZV_BACKEND/RDZV_ENDPOINT (default c10d on MASTER_ADDR:MASTER_PORT; etcd-v2 on an etcd
# server survives the loss of the MASTER_ADDR machine). Re-running the command resumes from WORK_DIR too.
# DEVICE (npu, cuda or cpu) overrides the device; by default an Ascend NPU, else a CUDA GPU, else the CPU.
# HCCL_CONNECT_TIMEOUT (Ascend's link setup wait) follows DIST_TIMEOUT unless set, within HCCL's 120-7200 s.
# DRY_RUN=1 prints the torchrun command and the settings each device trains with, instead of running it.
# SIGTERM or SIGUSR1 (what SLURM, Kubernetes and spot instances send before they kill) to this script stops the run
# within seconds: every rank finishes its step, rank 0 saves that iteration, exit code 128 + the signal; relaunching
# the same command resumes there.
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

case "$DEPTH" in
  18) RECIPE=mmseg_r18 ;;
  50) RECIPE=ascend_r50 ;;
  *) echo "error: DEPTH=$DEPTH: the recipes are for DEPTH=18 and DEPTH=50" >&2; exit 2 ;;
esac
case "$MODE" in
  full) ;;
  perf) RECIPE+=_perf ;;
  *) echo "usage: bash run_8p.sh [full|perf] [extra train.py args]" >&2; exit 2 ;;
esac
# the recipe's settings on this many devices, checked before any process starts (e.g. mmseg_r18 needs 1, 2, 4 or 8)
SETTINGS=$(WORLD_SIZE=$DEVICES python train.py --recipe "$RECIPE" --print-recipe "$@")
WORK_DIR=${WORK_DIR:-work_dirs/bisenetv1_r${DEPTH}_${MODE}_${DEVICES}p}
# A fresh store for each restart: with the shared one, restarted gloo ranks can read the dead ranks' addresses and
# wait forever (seen with torch 2.13 in tests/test_safety.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun, ending without a traceback when SIGTERM or SIGUSR1 (SLURM's --signal) stops the run: it passes the signal
# to train.py, which saves the iteration it reached; the exit code is then 128 + the signal, as train.py's own. A rank
# whose error a restart would repeat (bad data, a flag) sends SIGUSR2 (BISENET_LAUNCHER_PID): the group stops, exit 2.
TORCHRUN='import os, signal, sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main
os.environ["BISENET_LAUNCHER_PID"], exit_code = str(os.getpid()), {}
def stop(signum, _frame):
    exit_code.setdefault("code", 2 if signum == signal.SIGUSR2 else 128 + signum)
    signal.raise_signal(signal.SIGTERM)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGUSR2, stop)
try:
    main()
except SignalException as e:
    sys.exit(exit_code.get("code", 128 + e.sigval))'
LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}"
  --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}"
  --rdzv-id "${RUN_ID:-$(basename "$WORK_DIR")}"
  train.py --device "$DEVICE" --recipe "$RECIPE" --data-root "$DATA_ROOT" --work-dir "$WORK_DIR" --resume "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT python -m torch.distributed.run ${LAUNCH[*]}"
  echo "$SETTINGS"
  exit 0
fi
# data that every rank would refuse is said once, before any rank starts
python -c 'import sys, cli, cityscapes; cli.main(cityscapes.open_dataset, sys.argv[1], "train")' "$DATA_ROOT"
exec python -c "$TORCHRUN" "${LAUNCH[@]}"
