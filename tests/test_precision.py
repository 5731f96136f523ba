"""O1's precision follows what the CPU computes natively (device.cpu_amp_dtype), and every script
says what ran."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from deploy import openvino_precision
from device import (
    PRECISION_NAMES,
    CpuFeatures,
    Runtime,
    cpu_amp_dtype,
    cpu_trains_channels_last,
    default_amp_dtype,
)

AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}  # ATen's and oneDNN's own ISA limits

# What lscpu and torch report on the CPU kinds this project meets (and the ISA limits a user may
# set).
ZEN2 = CpuFeatures(aten_capability="AVX2", avx512_bf16=False, amx_bf16=False)
ZEN4 = CpuFeatures(aten_capability="AVX512", avx512_bf16=True, amx_bf16=False)
SAPPHIRE_RAPIDS = CpuFeatures(aten_capability="AVX512", avx512_bf16=True, amx_bf16=True)
SKYLAKE = CpuFeatures(aten_capability="AVX512", avx512_bf16=False, amx_bf16=False)


@pytest.mark.parametrize(
    "features, dtype, reason",
    [
        (ZEN2, torch.float32, "this CPU has no bf16 instructions: AVX2"),
        (SKYLAKE, torch.float32, "this CPU has no bf16 instructions: AVX512"),
        (ZEN4, torch.bfloat16, "natively: AVX512-BF16"),
        (SAPPHIRE_RAPIDS, torch.bfloat16, "natively: AMX-BF16"),
        (
            CpuFeatures("AVX2", True, True, "AVX2"),
            torch.float32,
            "ATEN_CPU_CAPABILITY limits PyTorch to AVX2",
        ),
        (
            CpuFeatures("AVX512", True, True, "AVX2"),
            torch.float32,
            "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from",
        ),
        (
            CpuFeatures("AVX512", True, True, "avx512_core_bf16"),
            torch.bfloat16,
            "natively: AVX512-BF16",
        ),
        (
            CpuFeatures("AVX512", True, True, "AVX512_CORE_AMX"),
            torch.bfloat16,
            "natively: AMX-BF16",
        ),
        (CpuFeatures("AVX512", True, True, "DEFAULT"), torch.bfloat16, "natively: AMX-BF16"),
        (
            CpuFeatures("AVX512", True, False, "AVX512_CORE_VNNI"),
            torch.float32,
            "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI",
        ),
    ],
)
def test_cpu_o1_precision_is_decided_from_the_instructions(features, dtype, reason):
    decided, why = cpu_amp_dtype(features)
    assert decided == dtype and reason in why


@pytest.mark.parametrize(
    "features, channels_last",
    [(ZEN2, False), (SKYLAKE, True), (ZEN4, True), (SAPPHIRE_RAPIDS, True)],
)
def test_cpu_training_memory_format_follows_the_isa(features, channels_last):
    assert cpu_trains_channels_last(features) == channels_last
    limited = CpuFeatures(features.aten_capability, features.avx512_bf16, features.amx_bf16, "AVX2")
    assert not cpu_trains_channels_last(limited)


def test_gpus_and_npus_keep_apex_o1_fp16_with_loss_scaling():
    for device_type in ("cuda", "npu"):
        assert default_amp_dtype(device_type, ZEN2)[0] == torch.float16
    assert Runtime(torch.device("cuda", 0)).precision("O1") == "fp16 autocast"


def test_fp32_runtime_runs_o1_without_autocast_or_loss_scaling():
    runtime = Runtime(
        torch.device("cpu"),
        amp_dtype=torch.float32,
        amp_reason="this CPU has no bf16 instructions: AVX2",
    )
    conv = torch.nn.Conv2d(3, 4, 3)
    with runtime.autocast("O1"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    assert runtime.precision("O1") == "fp32" and not runtime.grad_scaler("O1").is_enabled()
    assert openvino_precision(runtime, "O1") == "f32"  # OpenVINO follows the same decision
    note = runtime.precision_note("O1")
    assert note == (
        "precision: fp32 (this CPU has no bf16 instructions: AVX2; --amp-dtype bfloat16 "
        "forces bf16, which this CPU emulates many times slower than fp32)"
    )


@pytest.mark.parametrize(
    "forced, dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
)
def test_forced_amp_dtype_runs_what_it_names(forced, dtype):
    runtime = Runtime(torch.device("cpu"), amp_dtype=forced)
    conv = torch.nn.Conv2d(3, 4, 3)
    with runtime.autocast("O1"):
        ran = conv(torch.randn(1, 3, 8, 8)).dtype
    assert ran == dtype and runtime.precision("O1") == f"{PRECISION_NAMES[dtype]} autocast"
    assert runtime.precision_note("O1").startswith(
        f"precision: {runtime.precision('O1')} (--amp-dtype "
    )
    assert runtime.grad_scaler("O1").is_enabled() == (dtype == torch.float16)
    assert openvino_precision(runtime, "O1") is None and openvino_precision(runtime, "O0") == "f32"


def test_this_machines_default_runs_what_it_says():
    runtime = Runtime(torch.device("cpu"))
    assert (runtime.amp_dtype, runtime.amp_reason) == cpu_amp_dtype(CpuFeatures.detect())
    conv = torch.nn.Conv2d(3, 4, 3)
    with runtime.autocast("O1"):
        ran = conv(torch.randn(1, 3, 8, 8)).dtype
    assert PRECISION_NAMES[ran] == runtime.precision("O1").split()[0]


def run_avx2(args):
    """A script on this machine with ATen and oneDNN limited to AVX2: what an AVX2-only CPU gets on
    any CPU."""
    env = {**os.environ, **AVX2_ONLY, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env
    )


@pytest.mark.slow
def test_isa_limits_are_detected():
    result = run_avx2(
        [
            "-c",
            "import device, json; f = device.CpuFeatures.detect(); "
            "print(json.dumps([f.aten_capability, f.onednn_max_isa]))",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["AVX2", "AVX2"]


@pytest.mark.slow
def test_train_and_evaluate_print_and_record_the_precision_that_ran(synthetic_root, tmp_path):
    args = ["--data-root", str(synthetic_root), "--work-dir", str(tmp_path / "wd")]
    args += "--depth 18 --batch-size 2 --crop 64x128 --workers 0 --iters 2".split()
    trained = run_avx2(["train.py", *args, "--no-validate", "--warmup-iters", "0"])
    assert trained.returncode == 0, trained.stderr[-2000:]
    notes = [
        line
        for line in (trained.stdout + trained.stderr).splitlines()
        if line.startswith("precision: ")
    ]
    host = (
        CpuFeatures.detect()
    )  # a bf16 CPU is held back by the limit; an AVX2 CPU has no bf16 to hold back
    why = (
        "ATEN_CPU_CAPABILITY limits PyTorch to AVX2"
        if host.avx512_bf16 or host.amx_bf16
        else "this CPU has no bf16 instructions: AVX2"
    )
    assert len(notes) == 1 and notes[0].startswith(f"precision: fp32 ({why}"), notes
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert (summary["amp"], summary["precision"]) == ("O1", "fp32")
    assert not torch.load(summary["checkpoint"], weights_only=True)[
        "scaler"
    ]  # fp32 needs no loss scaling

    evaluate = ["evaluate.py", "--ckpt", summary["checkpoint"], "--data-root", str(synthetic_root)]
    evaluated = run_avx2([*evaluate, "--workers", "0"])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (
        evaluated.stdout.startswith("device: cpu")
        and evaluated.stdout.splitlines()[1].startswith("precision: fp32 (")
        and json.loads(evaluated.stdout.strip().splitlines()[-1])["precision"] == "fp32"
    )

    timing = "--depth 18 --size 64x128 --runs 1 --warmup 0 --amp-dtype bfloat16".split()
    forced = run_avx2(["tools/benchmark_inference.py", *timing])
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert forced.stdout.splitlines()[1].startswith(
        "precision: bf16 autocast (--amp-dtype bfloat16; this CPU has no bf16 instructions"
    )
    assert json.loads(forced.stdout.strip().splitlines()[-1])["precision"] == "bf16 autocast"


def test_benchmark_warns_when_the_default_is_slower_than_fp32():
    from benchmark import slower_than_fp32

    slow = {
        "default": {"step_ms": 900.0},
        "fp32": {"step_ms": 300.0},
        "contiguous": {"step_ms": 250.0},
        "bf16": {"error": "x"},
    }
    assert slower_than_fp32(slow) == (
        "the default step (900 ms) is slower than eager fp32 (300 ms) on this device; "
        "fastest measured: contiguous (250 ms)"
    )
    assert slower_than_fp32({"default": {"step_ms": 300.0}, "fp32": {"step_ms": 900.0}}) is None
    assert slower_than_fp32({"default": {"step_ms": 300.0}}) is None
