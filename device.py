"""Every difference between CPU, NVIDIA GPUs and Ascend NPUs lives here: device, distributed backend,
autocast dtype, gradient scaler, memory format and optimizer kernels. torch_npu is imported only when --device npu
is asked for.
"""

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UsageError

DEFAULT_BACKEND = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
BACKENDS = ("nccl", "hccl", "gloo", "mpi", "ucc")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    amp_dtype: torch.dtype | None = None  # O1's half precision; None: the device's default (see __post_init__)

    def __post_init__(self):
        if self.amp_dtype is None:  # apex O1 was fp16; CPUs have no fast fp16 but AMX/AVX-512 bf16
            self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """In a process group (launched by torchrun), even a group of one: DDP and the collectives then run too."""
        return self.backend is not None

    @property
    def prefers_channels_last(self):
        """channels_last feeds oneDNN (CPU) and tensor cores (CUDA) best; Ascend picks its own internal formats."""
        return self.device.type != "npu"

    @property
    def fused_optimizer(self):
        """One fused SGD kernel for all parameters: 2-4% faster steps on an H100 (README); elsewhere torch's default."""
        return self.device.type == "cuda"

    @property
    def name(self):
        """The accelerator's marketing name, or the CPU and its thread count."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "npu":
            return torch.npu.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    @property
    def pin_memory(self):
        """Page-locked host batches copy to the GPU asynchronously; elsewhere pinning only costs time."""
        return self.device.type == "cuda"

    @property
    def ddp_device_ids(self):
        return None if self.device.type == "cpu" else [self.device.index]

    @property
    def memory_format(self):
        return torch.channels_last if self.prefers_channels_last else torch.contiguous_format

    def autocast(self, amp):
        """apex O1 = conv/matmul in half precision (amp_dtype), weights and loss in fp32; O0 = fp32."""
        if amp == "O0":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def precision(self, amp):
        return "fp32" if amp == "O0" else f"{'fp16' if self.amp_dtype == torch.float16 else 'bf16'} autocast"

    def grad_scaler(self, amp):
        """Dynamic loss scaling for fp16 (apex O1's); bf16 and fp32 need none (the scaler is then a pass-through)."""
        enabled = amp == "O1" and self.amp_dtype == torch.float16
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


def launched_by_torchrun():
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(device="auto", device_id=0, amp_dtype="auto"):
    """Device from --device and, under torchrun, LOCAL_RANK; joins the process group when launched by torchrun."""
    kind = resolve_device_type(device)
    launched = launched_by_torchrun()
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    rank, local_rank = (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))) if launched else (0, device_id)
    index = local_rank if launched else device_id
    if kind == "cuda":
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: pick the fastest convolution algorithms once
    elif kind == "npu":
        torch.npu.set_device(index)
    runtime = Runtime(torch.device(kind, index) if kind != "cpu" else torch.device("cpu"), rank, local_rank, world_size, amp_dtype=AMP_DTYPES.get(amp_dtype))
    if launched:
        runtime.backend = os.environ.get("DIST_BACKEND", DEFAULT_BACKEND[kind])
        join_process_group(runtime, distributed_timeout())
    return runtime


def distributed_timeout():
    """DIST_TIMEOUT (seconds, default 1800): how long a rank waits for the others to start, or for a collective."""
    text = os.environ.get("DIST_TIMEOUT", "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise UsageError(f"DIST_TIMEOUT={text!r}: expected a positive number of seconds, e.g. 1800")
    return datetime.timedelta(seconds=seconds)


def join_process_group(runtime, timeout):
    if runtime.backend not in BACKENDS:
        raise UsageError(
            f"DIST_BACKEND={runtime.backend!r}: expected one of {', '.join(BACKENDS)} (or unset: {DEFAULT_BACKEND[runtime.device.type]} on {runtime.device.type})"
        )
    try:
        dist.init_process_group(runtime.backend, timeout=timeout)
    except dist.DistError as e:  # rank 0 waiting for the others, or a rank that cannot reach rank 0
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"rank {runtime.rank}: the process group of {runtime.world_size} did not form within {timeout.total_seconds():g} s ({reason}); "
            f"start every rank with the same MASTER_ADDR:MASTER_PORT and WORLD_SIZE (DIST_TIMEOUT sets the wait)"
        ) from None
    return runtime


def teardown(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
