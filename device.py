"""Every difference between CPU, NVIDIA GPUs and Ascend NPUs lives here: device, distributed backend,
autocast dtype (on a CPU, from the instructions it has), gradient scaler, memory format and optimizer kernels.
torch_npu is imported only when --device npu is asked for.
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
PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
EMULATED_BF16 = "about 10x slower here"  # bf16 without AMX/AVX512-BF16 (README: Performance)

# oneDNN's instruction sets, lowest first (its ONEDNN_MAX_CPU_ISA values; the AVX10 names and their aliases).
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX")
ONEDNN_ALIASES = {
    "AVX512_CORE_FP16": "AVX10_1_512",
    "AVX512_CORE_AMX": "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16": "AVX10_1_512_AMX",
}


@dataclass(frozen=True)
class CpuFeatures:
    """What decides the CPU's O1 precision: the hardware's bf16 instructions, and the instruction sets ATen and
    oneDNN are allowed to use (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower them below the hardware's)."""

    aten_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    avx512_bf16: bool
    amx_bf16: bool
    onednn_max_isa: str | None = None  # ONEDNN_MAX_CPU_ISA as set, None when unset

    @property
    def aten_avx512(self):
        return self.aten_capability.upper().startswith(("AVX512", "AMX"))

    @classmethod
    def detect(cls):
        return cls(
            aten_capability=torch.backends.cpu.get_cpu_capability(),
            avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
            amx_bf16=torch.cpu._is_amx_tile_supported(),
            onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        )


def onednn_allows(max_isa, isa):
    """Whether oneDNN may use `isa` under ONEDNN_MAX_CPU_ISA=max_isa (unset, DEFAULT or unknown: no limit)."""
    if max_isa is None:
        return True
    name = ONEDNN_ALIASES.get(max_isa.upper(), max_isa.upper())
    return name not in ONEDNN_ISAS or ONEDNN_ISAS.index(name) >= ONEDNN_ISAS.index(isa)


def cpu_amp_dtype(features):
    """(dtype, why) of O1 on this CPU: bf16 where it computes bf16 natively (AMX-BF16 or AVX512-BF16), else fp32,
    because bf16 without those instructions is emulated through fp32 conversions and is many times slower."""
    if not features.aten_avx512:
        if features.avx512_bf16 or features.amx_bf16:
            return torch.float32, f"ATEN_CPU_CAPABILITY limits PyTorch to {features.aten_capability}, which has no bf16 instructions"
        return torch.float32, f"this CPU has no bf16 instructions: {features.aten_capability}"
    if features.amx_bf16 and onednn_allows(features.onednn_max_isa, "AVX10_1_512_AMX"):
        return torch.bfloat16, "this CPU computes bf16 natively: AMX-BF16"
    if (features.avx512_bf16 or features.amx_bf16) and onednn_allows(features.onednn_max_isa, "AVX512_CORE_BF16"):
        return torch.bfloat16, "this CPU computes bf16 natively: AVX512-BF16"
    if features.avx512_bf16 or features.amx_bf16:
        return torch.float32, f"ONEDNN_MAX_CPU_ISA={features.onednn_max_isa} keeps oneDNN from the CPU's bf16 instructions"
    return torch.float32, f"this CPU has no bf16 instructions: {features.aten_capability}"


def cpu_trains_channels_last(features):
    """oneDNN's AVX-512 convolutions train fastest on channels_last tensors; its AVX2 ones backpropagate faster on
    contiguous ones (README: Performance, measured on both)."""
    return features.aten_avx512 and onednn_allows(features.onednn_max_isa, "AVX512_CORE")


def default_amp_dtype(device_type, cpu_features=None):
    """(dtype, why) of O1 when --amp-dtype is auto. apex O1 was fp16 with dynamic loss scaling, which GPUs and NPUs
    run natively; a CPU has no fast fp16, and bf16 only on some kinds (cpu_amp_dtype)."""
    if device_type != "cpu":
        return torch.float16, "fp16 with dynamic loss scaling, as apex O1"
    return cpu_amp_dtype(cpu_features or CpuFeatures.detect())


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    amp_dtype: torch.dtype | None = None  # what O1 computes in; torch.float32: no autocast; None: the device's default
    amp_reason: str = ""  # why amp_dtype, printed once at start (precision_note)

    def __post_init__(self):
        if self.amp_dtype is None:
            self.amp_dtype, self.amp_reason = default_amp_dtype(self.device.type)
        elif not self.amp_reason:
            self.amp_reason = f"--amp-dtype {next(k for k, v in AMP_DTYPES.items() if v == self.amp_dtype)}"
            if self.device.type == "cpu" and self.amp_dtype == torch.bfloat16 and cpu_amp_dtype(CpuFeatures.detect())[0] != torch.bfloat16:
                self.amp_reason += f"; this CPU has no bf16 instructions, so {EMULATED_BF16}"

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """In a process group (launched by torchrun), even a group of one: DDP and the collectives then run too."""
        return self.backend is not None

    @property
    def prefers_channels_last(self):
        """Training: channels_last feeds tensor cores (CUDA) and AVX-512 oneDNN best (cpu_trains_channels_last);
        Ascend picks its own internal formats."""
        if self.device.type == "cpu":
            return cpu_trains_channels_last(CpuFeatures.detect())
        return self.device.type != "npu"

    @property
    def fused_optimizer(self):
        """One fused SGD kernel for all parameters: faster steps on CUDA (README: Performance); elsewhere torch's default."""
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
        """Inference (BN folded, no backward): channels_last on CPUs of any kind and on CUDA."""
        return torch.contiguous_format if self.device.type == "npu" else torch.channels_last

    def autocast(self, amp):
        """apex O1 = conv/matmul in half precision (amp_dtype), weights and loss in fp32; O0 = fp32."""
        if amp == "O0" or self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def precision(self, amp):
        """What really runs: "fp32", "bf16 autocast" or "fp16 autocast" (the JSON summaries' `precision`)."""
        if amp == "O0" or self.amp_dtype == torch.float32:
            return "fp32"
        return f"{PRECISION_NAMES[self.amp_dtype]} autocast"

    def precision_note(self, amp):
        """The line every script prints once at start, e.g. `precision: fp32 (this CPU has no bf16 instructions: AVX2; ...)`."""
        if amp == "O0":
            return "precision: fp32 (--amp O0)"
        hint = f"; --amp-dtype bfloat16 forces bf16, {EMULATED_BF16}" if self.device.type == "cpu" and self.amp_dtype == torch.float32 else ""
        return f"precision: {self.precision(amp)} ({self.amp_reason}{hint})"

    def openvino_precision(self, amp):
        """OpenVINO's INFERENCE_PRECISION_HINT for the same O1: "f32" where PyTorch runs fp32, else None (its own choice)."""
        return "f32" if self.precision(amp) == "fp32" else None

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
