"""Every difference between CPU, NVIDIA GPUs and Ascend NPUs lives here: device, distributed
backend, autocast dtype (on a CPU, from the instructions it has), gradient scaler, memory format,
optimizer kernels, where the metric is counted and which options a device supports. torch_npu is
imported only where it is installed: for --device npu, and for --device auto when importlib finds
it.
"""

import datetime
import importlib.util
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import UsageError, first_line

DEFAULT_BACKEND = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
BACKENDS = ("nccl", "hccl", "gloo", "mpi", "ucc")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISION_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# bf16 without AMX/AVX512-BF16 (docs/performance.md)
EMULATED_BF16 = "many times slower than fp32"

# oneDNN's instruction sets, lowest first (its ONEDNN_MAX_CPU_ISA values; AVX10 names and aliases).
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
)
ONEDNN_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512"} | dict.fromkeys(
    ("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16"), "AVX10_1_512_AMX"
)


@dataclass(frozen=True)
class CpuFeatures:
    """What decides the CPU's O1 precision: the hardware's bf16 instructions, and the instruction
    sets ATen and oneDNN may use (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower them)."""

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
            torch.backends.cpu.get_cpu_capability(),
            avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
            amx_bf16=torch.cpu._is_amx_tile_supported(),
            onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        )


def onednn_allows(max_isa, isa):
    """Whether oneDNN may use isa under ONEDNN_MAX_CPU_ISA=max_isa (unset/DEFAULT/unknown: any)."""
    if max_isa is None:
        return True
    name = ONEDNN_ALIASES.get(max_isa.upper(), max_isa.upper())
    return name not in ONEDNN_ISAS or ONEDNN_ISAS.index(name) >= ONEDNN_ISAS.index(isa)


def cpu_amp_dtype(features):
    """(dtype, why) of O1 on this CPU: bf16 where it computes bf16 natively (AMX-BF16, AVX512-BF16),
    else fp32: without those instructions bf16 is emulated through fp32, many times slower."""
    if not (features.avx512_bf16 or features.amx_bf16):
        return torch.float32, f"this CPU has no bf16 instructions: {features.aten_capability}"
    if not features.aten_avx512:
        limit = f"ATEN_CPU_CAPABILITY limits PyTorch to {features.aten_capability}"
        return torch.float32, f"{limit}, which has no bf16 instructions"
    if features.amx_bf16 and onednn_allows(features.onednn_max_isa, "AVX10_1_512_AMX"):
        return torch.bfloat16, "this CPU computes bf16 natively: AMX-BF16"
    if onednn_allows(features.onednn_max_isa, "AVX512_CORE_BF16"):
        return torch.bfloat16, "this CPU computes bf16 natively: AVX512-BF16"
    limit = f"ONEDNN_MAX_CPU_ISA={features.onednn_max_isa}"
    return torch.float32, f"{limit} keeps oneDNN from the CPU's bf16 instructions"


def cpu_trains_channels_last(features):
    """oneDNN's AVX-512 convolutions train fastest on channels_last tensors; its AVX2 ones
    backpropagate faster on contiguous ones (docs/performance.md, measured on both)."""
    return features.aten_avx512 and onednn_allows(features.onednn_max_isa, "AVX512_CORE")


def default_amp_dtype(device_type, cpu_features=None):
    """(dtype, why) of O1 when --amp-dtype is auto: apex O1's fp16 with dynamic loss scaling, which
    GPUs and NPUs run natively; a CPU has no fast fp16, and bf16 only some kinds (cpu_amp_dtype)."""
    if device_type != "cpu":
        return torch.float16, "fp16 with dynamic loss scaling, as apex O1"
    return cpu_amp_dtype(cpu_features or CpuFeatures.detect())


def npu_amp_dtype_error(dtype):
    """Why this NPU cannot autocast to dtype, or None: torch_npu autocasts to bf16 only on chips
    that have it (not the 910A) and otherwise switches autocast off with a warning, so the run would
    train in fp32 unnoticed."""
    if dtype == torch.bfloat16 and not torch.npu.is_bf16_supported():
        name = torch.npu.get_device_name()
        chip = f"this {name} has no bf16 (torch.npu.is_bf16_supported() is False)"
        return (
            f"--amp-dtype bfloat16: {chip} and would train in fp32; "
            "leave --amp-dtype out (fp16 with loss scaling)"
        )
    return None


def sgd(params, *, lr, momentum, weight_decay, kernel="default"):
    """torch's SGD (kernel "default": its own choice; "fused": one kernel for all parameters) or
    torch_npu's NpuFusedSGD ("npu-fused": parameters and gradients in one combined buffer each).
    Each optimizer is cleared with its own zero_grad() default: NpuFusedSGD refuses set_to_none,
    which would drop its combined gradients."""
    if kernel == "npu-fused":
        from torch_npu.optim import NpuFusedSGD

        return NpuFusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=kernel == "fused" or None
    )


def npu_option_error(
    *, compile=False, channels_last=None, torch_npu_version="0.0", triton_installed=False
):
    """Why an option cannot run on this torch_npu, or None. torch.compile has no NPU backend before
    torch_npu 2.6, which then needs triton-ascend; channels_last is left to torch_npu, which
    converts to its own internal formats."""
    major, minor = (torch_npu_version.split(".") + ["0"])[:2]  # '2.6.0rc1', '2.1.0.post3'
    if compile:
        version = (int(major), int("".join(c for c in minor if c.isdigit()) or 0))
        if version < (2, 6) or not triton_installed:
            return (
                f"--compile: torch_npu {torch_npu_version} has no torch.compile backend "
                "(it needs torch_npu >= 2.6 with triton-ascend); leave --compile out"
            )
    if channels_last:
        return (
            "--channels-last: torch_npu picks its own internal memory formats on Ascend; "
            "leave --channels-last out"
        )
    return None


def cpu_share(cpus, local_rank, local_world_size):
    """This rank's contiguous slice of the host's cores, as Ascend's port pins each device's process
    (taskset), so the ranks' loader workers and host-side operators do not compete for cores."""
    cpus = sorted(cpus)
    per_rank = len(cpus) // max(local_world_size, 1)
    return cpus[local_rank * per_rank : (local_rank + 1) * per_rank] if per_rank else cpus


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    # what O1 computes in; torch.float32: no autocast; None: the device's default
    amp_dtype: torch.dtype | None = None
    amp_reason: str = ""  # why amp_dtype, printed once at start (precision_note)
    device_reason: str = ""  # why this device, printed first (device_note)

    def __post_init__(self):
        if self.amp_dtype is None:
            self.amp_dtype, self.amp_reason = default_amp_dtype(self.device.type)
        elif not self.amp_reason:
            name = next(k for k, v in AMP_DTYPES.items() if v == self.amp_dtype)
            self.amp_reason = f"--amp-dtype {name}"
            cpu_bf16 = self.device.type == "cpu" and self.amp_dtype == torch.bfloat16
            if cpu_bf16 and cpu_amp_dtype(CpuFeatures.detect())[0] != torch.bfloat16:
                emulates = f"this CPU has no bf16 instructions, so it emulates bf16 {EMULATED_BF16}"
                self.amp_reason += f"; {emulates}"

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """In a process group (torchrun), even of one: DDP and the collectives then run too."""
        return self.backend is not None

    @property
    def prefers_channels_last(self):
        """Training: channels_last feeds tensor cores (CUDA) and AVX-512 oneDNN best
        (cpu_trains_channels_last); Ascend picks its own internal formats."""
        if self.device.type == "cpu":
            return cpu_trains_channels_last(CpuFeatures.detect())
        return self.device.type != "npu"

    @property
    def sgd_kernel(self):
        """CUDA: one fused kernel (docs/performance.md). Ascend: NpuFusedSGD where torch_npu has it,
        because torch_npu turns foreach off on the 910A (and on the 910B before CANN 8.0.RC3) and
        has no fused SGD before torch 2.7."""
        if self.device.type == "cuda":
            return "fused"
        if self.device.type == "npu":
            try:
                from torch_npu.optim import NpuFusedSGD  # noqa: F401
            except ImportError:
                return "default"
            return "npu-fused"
        return "default"

    def check_options(self, *, compile=False, channels_last=None):
        """Refuses, in one line, an option this device cannot run as asked."""
        if self.device.type != "npu":
            return
        import torch_npu

        error = npu_option_error(
            compile=compile,
            channels_last=channels_last,
            torch_npu_version=torch_npu.__version__,
            triton_installed=importlib.util.find_spec("triton") is not None,
        )
        if error:
            raise UsageError(error)

    @property
    def name(self):
        """The accelerator's marketing name, or the CPU and its thread count."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "npu":
            return torch.npu.get_device_name(self.device.index)
        return f"cpu ({torch.get_num_threads()} threads)"

    @property
    def device_note(self):
        """The first line every script prints, e.g.
        `device: npu:0, Ascend910B3 (--device auto: torch_npu sees 8 NPUs)`."""
        if self.device.type == "cpu":
            threads = torch.get_num_threads()
            where = f"cpu, {threads} thread{'s' if threads != 1 else ''}"
        else:
            where = f"{self.device}, {self.name}"
        why = f" ({self.device_reason})" if self.device_reason else ""
        return f"device: {where}{why}"

    @property
    def pin_memory(self):
        """Pinned batches copy to an accelerator asynchronously; on a CPU it only costs time."""
        return self.device.type in ("cuda", "npu")

    @property
    def pin_memory_device(self):
        """torch before the accelerator API pins for CUDA unless told the device; newer torch pins
        for the current accelerator and warns about the argument."""
        return "npu" if self.device.type == "npu" and not hasattr(torch, "accelerator") else ""

    @property
    def ddp_device_ids(self):
        return None if self.device.type == "cpu" else [self.device.index]

    @property
    def memory_format(self):
        """Inference (BN folded, no backward): channels_last on CPUs of any kind and on CUDA."""
        return torch.contiguous_format if self.device.type == "npu" else torch.channels_last

    @property
    def metric_device(self):
        """Where the confusion matrix is counted: on CUDA beside the predictions; on Ascend on the
        host, as Ascend's port does (bincount runs on the NPU's slow AI CPU, compiled per shape)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def autocast_dtype(self, amp):
        """What convolutions and matmuls compute in under --amp amp; None: everything stays fp32."""
        return None if amp == "O0" or self.amp_dtype == torch.float32 else self.amp_dtype

    def autocast(self, amp):
        """apex O1: conv/matmul in amp_dtype, weights and loss in fp32; O0: all fp32."""
        dtype = self.autocast_dtype(amp)
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def precision(self, amp):
        """What runs: "fp32", "bf16 autocast" or "fp16 autocast" (the summaries' `precision`)."""
        dtype = self.autocast_dtype(amp)
        return "fp32" if dtype is None else f"{PRECISION_NAMES[dtype]} autocast"

    def precision_note(self, amp):
        """The line every script prints once at start, e.g.
        `precision: fp32 (this CPU has no bf16 instructions: AVX2; ...)`."""
        if amp == "O0":
            return "precision: fp32 (--amp O0)"
        hint = ""
        if self.device.type == "cpu" and self.amp_dtype == torch.float32:
            hint = f"; --amp-dtype bfloat16 forces bf16, which this CPU emulates {EMULATED_BF16}"
        return f"precision: {self.precision(amp)} ({self.amp_reason}{hint})"

    def grad_scaler(self, amp, loss_scale=None):
        """Loss scaling for fp16 (apex O1's): dynamic, or from loss_scale on and never grown
        (train.py puts it back after an overflow); bf16 and fp32 need none (the scaler is off)."""
        options = dict(enabled=self.autocast_dtype(amp) == torch.float16)
        if loss_scale:
            options.update(init_scale=float(loss_scale), growth_interval=2**31 - 1)
        if self.device.type == "npu":
            return torch.npu.amp.GradScaler(**options)
        return torch.amp.GradScaler(self.device.type, **options)

    def load_scaler_state(self, scaler, state):
        """A GradScaler state saved on any device: torch_npu's keeps a `dynamic` flag that torch's
        has not and needs it on load; scale and growth tracker carry over both ways."""
        state = (
            {**state, "dynamic": state.get("dynamic", True)}
            if self.device.type == "npu"
            else {k: v for k, v in state.items() if k != "dynamic"}
        )
        scaler.load_state_dict(state)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "npu":
            torch.npu.synchronize(self.device)

    def any_rank(self, flag):
        """Whether any rank's flag is set (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        flags = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags.item())

    def broadcast(self, tensor):
        """Rank 0's tensor on every rank, on the device (hccl sends no host tensors)."""
        tensor = tensor.to(self.device)
        if self.distributed:
            dist.broadcast(tensor, 0)
        return tensor

    def all_reduce_counts(self, counts):
        """A copy of counts summed over ranks, through the device (hccl reduces no host tensors)."""
        if not self.distributed:
            return counts
        total = counts.to(self.device, torch.long, copy=True)
        dist.all_reduce(total)
        return total.to(counts.device)

    def share_buffers(self, model):
        """Rank 0's BatchNorm statistics to every rank before validation: DDP runs with
        broadcast_buffers=False (as Ascend's port and mmengine), so each rank's running stats drift
        apart during training (mmcv's EvalHook broadcasts them the same way)."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)


def torch_npu_error():
    """None once torch_npu is imported (it registers the npu device and hccl backend), else why."""
    try:
        import torch_npu  # noqa: F401
    # without CANN, torch_npu may call sys.exit
    except (ImportError, SystemExit, RuntimeError) as e:
        return f"{type(e).__name__}: {first_line(e, 160)}"
    return None


def npu_present():
    """(whether torch_npu is installed and sees an NPU, why). importlib finds the package without
    importing it; torch >= 2.5 may have loaded it at `import torch` (unless
    TORCH_DEVICE_BACKEND_AUTOLOAD=0)."""
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch_npu is not installed"
    error = torch_npu_error()
    if error:
        return (
            False,
            f"torch_npu is installed but does not load ({error}); source CANN's set_env.sh",
        )
    count = torch.npu.device_count() if torch.npu.is_available() else 0
    return count > 0, f"torch_npu sees {count} NPU{'s' if count != 1 else ''}"


def choose_device(name):
    """(device type, why) from --device: auto takes an Ascend NPU, else a CUDA GPU, else the CPU."""
    if name == "auto":
        found, why = npu_present()
        if found:
            return "npu", f"--device auto: {why}"
        if torch.cuda.is_available():
            return "cuda", "--device auto: CUDA is available"
        return "cpu", f"--device auto: no CUDA device, {why}"
    if name == "npu" and (error := torch_npu_error()):
        needs = f"--device npu needs torch_npu and Ascend CANN ({error})"
        raise UsageError(f"{needs}; install them or use --device cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA device is available to this PyTorch build; "
            "use --device cpu (or auto)"
        )
    return name, f"--device {name}"


def setup_runtime(device="auto", device_id=0, *, amp_dtype="auto"):
    """Device from --device and, under torchrun, LOCAL_RANK; joins the process group when launched
    by torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    device_type, why = choose_device(device)
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    world_size, rank, index = 1, 0, device_id
    if launched:
        world_size = int(os.environ["WORLD_SIZE"])
        rank, index = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(index)
        # fixed crop sizes: pick the fastest convolution algorithms once
        torch.backends.cudnn.benchmark = True
    elif device_type == "npu":
        torch.npu.set_device(index)
        error = npu_amp_dtype_error(AMP_DTYPES.get(amp_dtype))
        if error:
            raise UsageError(error)
        if launched and hasattr(os, "sched_setaffinity"):
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            os.sched_setaffinity(0, cpu_share(os.sched_getaffinity(0), index, local_world_size))
    device = torch.device(device_type, index) if device_type != "cpu" else torch.device("cpu")
    runtime = Runtime(
        device, rank, world_size, amp_dtype=AMP_DTYPES.get(amp_dtype), device_reason=why
    )
    if launched:
        runtime.backend = os.environ.get("DIST_BACKEND", DEFAULT_BACKEND[device_type])
        join_process_group(runtime, distributed_timeout())
    return runtime


def distributed_timeout():
    """DIST_TIMEOUT (seconds, default 1800): how long a rank waits for others or a collective."""
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
        unset = f"{DEFAULT_BACKEND[runtime.device.type]} on {runtime.device.type}"
        expected = f"expected one of {', '.join(BACKENDS)} (or unset: {unset})"
        raise UsageError(f"DIST_BACKEND={runtime.backend!r}: {expected}")
    try:
        dist.init_process_group(runtime.backend, timeout=timeout)
    # rank 0 waiting for the others, or a rank that cannot reach rank 0
    except dist.DistError as e:
        fix = (
            "start every rank with the same MASTER_ADDR:MASTER_PORT and WORLD_SIZE "
            "(DIST_TIMEOUT sets the wait)"
        )
        group = f"the process group of {runtime.world_size} did not form"
        waited = f"within {timeout.total_seconds():g} s ({first_line(e, 200)})"
        raise UsageError(f"rank {runtime.rank}: {group} {waited}; {fix}") from None
    return runtime


def teardown_runtime(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
