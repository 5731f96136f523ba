"""Every difference between CPU, NVIDIA GPUs and Ascend NPUs. torch_npu is imported only for
--device npu, and for --device auto when importlib finds it installed."""

import datetime
import importlib
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
EMULATED_BF16 = "many times slower than fp32"  # bf16 without AMX/AVX512-BF16: docs/performance.md

# ONEDNN_MAX_CPU_ISA's values, lowest first; any other (DEFAULT, AMX's other names) allows all
ONEDNN_ISAS = (
    "SSE41 AVX AVX2 AVX2_VNNI AVX2_VNNI_2 AVX512_CORE AVX512_CORE_VNNI AVX512_CORE_BF16 "
    "AVX10_1_512 AVX10_1_512_AMX"
).split()


@dataclass(frozen=True)
class CpuFeatures:
    """What decides O1's precision on a CPU: its bf16 instructions and the ISA limits set."""

    aten_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    avx512_bf16: bool
    amx_bf16: bool
    onednn_max_isa: str | None = None  # None: unset

    @property
    def aten_avx512(self):
        return self.aten_capability.upper().startswith(("AVX512", "AMX"))

    @classmethod
    def detect(cls):
        capability = torch.backends.cpu.get_cpu_capability()
        bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
        return cls(capability, bf16, amx, os.environ.get("ONEDNN_MAX_CPU_ISA") or None)

    def onednn_allows(self, isa):
        """Whether ONEDNN_MAX_CPU_ISA lets oneDNN use isa (unset, DEFAULT or unknown: any)."""
        if self.onednn_max_isa is None:
            return True
        name = self.onednn_max_isa.upper()
        name = "AVX10_1_512" if name == "AVX512_CORE_FP16" else name
        return name not in ONEDNN_ISAS or ONEDNN_ISAS.index(name) >= ONEDNN_ISAS.index(isa)


def cpu_amp_dtype(features):
    """(dtype, why) of O1 on a CPU: bf16 where it computes it natively, else fp32, not emulated."""
    if not (features.avx512_bf16 or features.amx_bf16):
        return torch.float32, f"this CPU has no bf16 instructions: {features.aten_capability}"
    if not features.aten_avx512:
        limit = f"ATEN_CPU_CAPABILITY limits PyTorch to {features.aten_capability}"
        return torch.float32, f"{limit}, which has no bf16 instructions"
    if features.amx_bf16 and features.onednn_allows("AVX10_1_512_AMX"):
        return torch.bfloat16, "this CPU computes bf16 natively: AMX-BF16"
    if features.onednn_allows("AVX512_CORE_BF16"):
        return torch.bfloat16, "this CPU computes bf16 natively: AVX512-BF16"
    limit = f"ONEDNN_MAX_CPU_ISA={features.onednn_max_isa}"
    return torch.float32, f"{limit} keeps oneDNN from the CPU's bf16 instructions"


def cpu_trains_channels_last(features):
    """oneDNN's AVX-512 convolutions train fastest on channels_last tensors; its AVX2 ones
    backpropagate faster on contiguous ones (docs/performance.md, measured on both)."""
    return features.aten_avx512 and features.onednn_allows("AVX512_CORE")


def default_amp_dtype(device_type, cpu_features=None):
    """(dtype, why) of O1 for --amp-dtype auto: apex O1's fp16 on GPUs and NPUs, which have it."""
    if device_type != "cpu":
        return torch.float16, "fp16 with dynamic loss scaling, as apex O1"
    return cpu_amp_dtype(cpu_features or CpuFeatures.detect())


def sgd(params, *, lr, momentum, weight_decay, kernel="default"):
    """torch's SGD ("default", or "fused" for one kernel) or torch_npu's NpuFusedSGD ("npu-fused"),
    which refuses zero_grad(set_to_none=True): each is cleared with its own default."""
    if kernel == "npu-fused":
        from torch_npu.optim import NpuFusedSGD

        return NpuFusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    fused = kernel == "fused" or None
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


def npu_option_error(torch_npu_version, triton_installed, compile, channels_last):
    major, minor = (torch_npu_version.split(".") + ["0"])[:2]  # '2.6.0rc1', '2.1.0.post3'
    version = (int(major), int("".join(c for c in minor if c.isdigit()) or 0))
    if compile and (version < (2, 6) or not triton_installed):
        no_backend = f"torch_npu {torch_npu_version} has no torch.compile backend"
        needs = "it needs torch_npu >= 2.6 with triton-ascend"
        return f"--compile: {no_backend} ({needs}); leave --compile out"
    if channels_last:
        formats = "torch_npu picks its own internal memory formats on Ascend"
        return f"--channels-last: {formats}; leave --channels-last out"
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
    device_reason: str = ""  # why this device (device_note)

    def __post_init__(self):
        if self.amp_dtype is None:
            self.amp_dtype, self.amp_reason = default_amp_dtype(self.device.type)
        elif not self.amp_reason:
            self.amp_reason = f"--amp-dtype {str(self.amp_dtype).removeprefix('torch.')}"
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
        """Training: channels_last feeds tensor cores and AVX-512 oneDNN best; not Ascend's."""
        if self.device.type == "cpu":
            return cpu_trains_channels_last(CpuFeatures.detect())
        return self.device.type != "npu"

    @property
    def sgd_kernel(self):
        """CUDA: one fused kernel (docs/performance.md). Ascend: NpuFusedSGD where torch_npu has it,
        because torch_npu turns foreach off on the 910A (and on the 910B before CANN 8.0.RC3) and
        has no fused SGD before torch 2.7."""
        if self.device.type == "npu":
            try:
                from torch_npu.optim import NpuFusedSGD  # noqa: F401
            except ImportError:
                return "default"
            return "npu-fused"
        return "fused" if self.device.type == "cuda" else "default"

    def check_options(self, *, compile=False, channels_last=None):
        if self.device.type == "npu":
            version = importlib.import_module("torch_npu").__version__
            triton = importlib.util.find_spec("triton") is not None
            if error := npu_option_error(version, triton, compile, channels_last):
                raise UsageError(error)

    @property
    def name(self):
        if self.device.type == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return getattr(torch, self.device.type).get_device_name(self.device.index)

    @property
    def device_note(self):
        where = f"{self.device}, {self.name}"
        if self.device.type == "cpu":
            threads = torch.get_num_threads()
            where = f"cpu, {threads} thread{'s' if threads != 1 else ''}"
        why = f" ({self.device_reason})" if self.device_reason else ""
        return f"device: {where}{why}"

    @property
    def pin_memory(self):
        """Pinned batches copy to an accelerator asynchronously; on a CPU it only costs time."""
        return self.device.type != "cpu"

    @property
    def pin_memory_device(self):
        """torch before the accelerator API (2.6) pins for CUDA unless told the device; newer torch
        pins for the current accelerator and warns about the argument."""
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
        return None if amp == "O0" or self.amp_dtype == torch.float32 else self.amp_dtype

    def autocast(self, amp):
        """apex O1: conv/matmul in amp_dtype, weights and loss in fp32; O0: all fp32."""
        dtype = self.autocast_dtype(amp)
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def precision(self, amp):
        """The summaries' `precision`: "fp32", "bf16 autocast" or "fp16 autocast"."""
        dtype = self.autocast_dtype(amp)
        return "fp32" if dtype is None else f"{PRECISION_NAMES[dtype]} autocast"

    def precision_note(self, amp):
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
        kept = {k: v for k, v in state.items() if k != "dynamic"}
        npu = {"dynamic": state.get("dynamic", True)} if self.device.type == "npu" else {}
        scaler.load_state_dict(kept | npu)

    def synchronize(self):
        getattr(torch, self.device.type).synchronize(self.device)

    def any_rank(self, flag):
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
        """Rank 0's BatchNorm statistics to every rank before validation, as mmcv's EvalHook: DDP
        runs with broadcast_buffers=False (as Ascend's port and mmengine), so they drift apart."""
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


def choose_device(name):
    """(device type, why) from --device: auto takes an Ascend NPU, else a CUDA GPU, else the CPU.
    find_spec does not import torch_npu (torch >= 2.5 may have, unless its autoload is off)."""
    if name == "auto":
        if importlib.util.find_spec("torch_npu") is None:
            why = "torch_npu is not installed"
        elif error := torch_npu_error():
            why = f"torch_npu is installed but does not load ({error}); source CANN's set_env.sh"
        else:
            count = torch.npu.device_count() if torch.npu.is_available() else 0
            why = f"torch_npu sees {count} NPU{'s' if count != 1 else ''}"
            if count:
                return "npu", f"--device auto: {why}"
        if torch.cuda.is_available():
            return "cuda", "--device auto: CUDA is available"
        return "cpu", f"--device auto: no CUDA device, {why}"
    if name == "npu" and (error := torch_npu_error()):
        needs = f"--device npu needs torch_npu and Ascend CANN ({error})"
        raise UsageError(f"{needs}; install them or use --device cpu")
    if name == "cuda" and not torch.cuda.is_available():
        no_cuda = "no CUDA device is available to this PyTorch build"
        raise UsageError(f"--device cuda: {no_cuda}; use --device cpu (or auto)")
    return name, f"--device {name}"


def setup_runtime(device="auto", device_id=0, *, amp_dtype="auto"):
    """Device from --device and, under torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT), LOCAL_RANK; there it joins the process group, on DIST_BACKEND or the default."""
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
        # torch_npu autocasts to bf16 only on chips that have it (not the 910A); on others it
        # switches autocast off with a warning, so the run would train in fp32 unnoticed
        if amp_dtype == "bfloat16" and not torch.npu.is_bf16_supported():
            no_bf16 = "has no bf16 (torch.npu.is_bf16_supported() is False) and would train in fp32"
            fix = "leave --amp-dtype out (fp16 with loss scaling)"
            chip = torch.npu.get_device_name()
            raise UsageError(f"--amp-dtype bfloat16: this {chip} {no_bf16}; {fix}")
        if launched and hasattr(os, "sched_setaffinity"):
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            os.sched_setaffinity(0, cpu_share(os.sched_getaffinity(0), index, local_world_size))
    device = torch.device("cpu") if device_type == "cpu" else torch.device(device_type, index)
    amp_dtype = AMP_DTYPES.get(amp_dtype)
    runtime = Runtime(device, rank, world_size, amp_dtype=amp_dtype, device_reason=why)
    if launched:
        runtime.backend = os.environ.get("DIST_BACKEND", DEFAULT_BACKEND[device_type])
        join_process_group(runtime)
    return runtime


def join_process_group(runtime):
    text = os.environ.get("DIST_TIMEOUT", "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise UsageError(f"DIST_TIMEOUT={text!r}: expected a positive number of seconds, e.g. 1800")
    timeout = datetime.timedelta(seconds=seconds)
    if runtime.backend not in BACKENDS:
        unset = f"{DEFAULT_BACKEND[runtime.device.type]} on {runtime.device.type}"
        expected = f"expected one of {', '.join(BACKENDS)} (or unset: {unset})"
        raise UsageError(f"DIST_BACKEND={runtime.backend!r}: {expected}")
    try:
        dist.init_process_group(runtime.backend, timeout=timeout)
    # rank 0 waiting for the others, or a rank that cannot reach rank 0
    except dist.DistError as e:
        group = f"rank {runtime.rank}: the process group of {runtime.world_size} did not form"
        waited = f"within {timeout.total_seconds():g} s ({first_line(e, 200)})"
        fix = "start every rank with the same MASTER_ADDR:MASTER_PORT and WORLD_SIZE"
        raise UsageError(f"{group} {waited}; {fix} (DIST_TIMEOUT sets the wait)") from None


def teardown_runtime(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
