"""Every difference between CPU, NVIDIA GPUs and Ascend NPUs lives here: device, distributed backend,
autocast dtype and gradient scaler. torch_npu is imported only when --device npu is asked for.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_BACKEND = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


class UsageError(Exception):
    """A flag or environment that cannot work. The message names the flag and the fix."""


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def prefers_channels_last(self):
        """channels_last feeds oneDNN (CPU) and tensor cores (CUDA) best; Ascend picks its own internal formats."""
        return self.device.type != "npu"

    @property
    def memory_format(self):
        return torch.channels_last if self.prefers_channels_last else torch.contiguous_format

    def autocast(self, amp):
        """apex O1 = conv/matmul in half precision, weights and loss in fp32: fp16 on accelerators, bf16 on CPU."""
        if amp == "O0":
            return nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, amp):
        """Dynamic loss scaling for fp16; bf16 and fp32 need none (the scaler is then a pass-through)."""
        enabled = amp == "O1" and self.device.type != "cpu"
        if self.device.type == "npu":
            return torch.npu.amp.GradScaler(enabled=enabled)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "npu":
            torch.npu.synchronize(self.device)

    def all_reduce_counts(self, counts):
        """Sums int64 counts on any backend: hccl reduces only 32-bit types, so counts travel as two int32 halves."""
        if not self.distributed:
            return counts
        low, high = (counts % 2**20).int(), (counts // 2**20).int()
        dist.all_reduce(low)
        dist.all_reduce(high)
        return high.long() * 2**20 + low.long()


def resolve_device_type(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the 'npu' device and the 'hccl' backend)
        except (ImportError, SystemExit, RuntimeError) as e:  # without CANN, torch_npu may call sys.exit
            raise UsageError(f"--device npu needs torch_npu and Ascend CANN ({type(e).__name__}: {e}); install them or use --device cpu") from None
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this PyTorch build; use --device cpu (or auto)")
    return name


def setup(device="auto", device_id=0):
    """Device from --device and, under torchrun, LOCAL_RANK; joins the process group when WORLD_SIZE > 1."""
    kind = resolve_device_type(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", device_id if world_size == 1 else 0))
    index = local_rank if world_size > 1 else device_id
    if kind == "cuda":
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: pick the fastest convolution algorithms once
    elif kind == "npu":
        torch.npu.set_device(index)
    runtime = Runtime(torch.device(kind, index) if kind != "cpu" else torch.device("cpu"), rank, local_rank, world_size)
    if world_size > 1:
        runtime.backend = os.environ.get("DIST_BACKEND", DEFAULT_BACKEND[kind])
        dist.init_process_group(runtime.backend)
    return runtime


def teardown(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
