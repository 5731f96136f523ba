import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from device import CpuFeatures, Runtime, cpu_amp_dtype

CPU_O1 = Runtime(torch.device("cpu")).precision(
    "O1"
)  # what O1 runs on this CPU (tests/test_precision.py)


def test_device_defaults_for_o1():
    cpu, cuda = Runtime(torch.device("cpu")), Runtime(torch.device("cuda", 0))
    assert (cpu.amp_dtype, cpu.sgd_kernel) == (cpu_amp_dtype(CpuFeatures.detect())[0], "default")
    assert (cuda.amp_dtype, cuda.precision("O1"), cuda.sgd_kernel) == (
        torch.float16,
        "fp16 autocast",
        "fused",
    )
    assert not cpu.grad_scaler("O1").is_enabled() and not cpu.distributed
    assert Runtime(torch.device("cpu"), amp_dtype=torch.float16).grad_scaler("O1").is_enabled()
    assert cuda.precision("O0") == "fp32"


@pytest.mark.slow
def test_bench_small_measures_every_part_and_ends_with_json():
    """`BENCH_SMALL=1 bash run_1p.sh bench`: steps, end-to-end train.py, torchrun train + resume +
    evaluate."""
    env = {**os.environ, "BENCH_SMALL": "1"}
    args = [
        "--steps",
        "2",
        "--warmup",
        "1",
        "--e2e-iters",
        "4",
        "--workers",
        "1",
        "--variants",
        "default,fp32,foreach-sgd",
    ]
    result = subprocess.run(
        ["bash", "run_1p.sh", "bench", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"device", "torch", "cuda", "cudnn", "cpus", "protocol", "wall_s"} <= out.keys()
    assert (
        out["device"].startswith("cpu")
        and out["torch"] == torch.__version__
        and out["size"] == "small"
    )
    for name, depth in (("r50", 50), ("r18", 18)):
        recipe = out["steps"][name]
        assert (recipe["depth"], recipe["batch"], recipe["crop"]) == (depth, 2, "64x128")
        assert recipe["variants"].keys() == {"default", "fp32", "foreach-sgd"}
        for variant in recipe["variants"].values():
            assert variant["step_ms"] > 0 and variant["first_step_s"] > 0 and "peak_gb" in variant
            assert abs(variant["img_s"] - 2 / variant["step_ms"] * 1000) < 0.01
        e2e = out["e2e"][name]
        assert (
            e2e["train_fps"] > 0 and 0 <= e2e["data_wait_frac"] < 1 and e2e["precision"] == CPU_O1
        )
    assert out["torchrun"] == {
        **out["torchrun"],
        "backend": "gloo",
        "world_size": 1,
        "resumed_at": 4,
        "iters": 6,
    }
    assert 0 <= out["torchrun"]["val_mIoU"] <= 100


@pytest.mark.slow
def test_bench_rejects_bad_flags_in_one_line():
    for flags, message in (
        (["--variants", "warp-drive"], "--variants: unknown ['warp-drive']"),
        (["--crop", "8x8", "--depth", "18"], "--crop 8x8"),
    ):
        result = subprocess.run(
            [sys.executable, "tools/benchmark.py", *flags], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert (
            result.stderr.strip().splitlines()[-1].startswith("error: ")
            and message in result.stderr
        )


@pytest.mark.slow
def test_bench_infer_small_measures_speed_agreement_and_a_timed_val_pass(tmp_path):
    """`BENCH_SMALL=1 bash run_1p.sh bench-infer`: what the GPU issue's one script measures, at CPU
    sizes."""
    env = {**os.environ, "BENCH_SMALL": "1"}
    args = ["--runs", "2", "--warmup", "1", "--workers", "1", "--work-dir", str(tmp_path)]
    result = subprocess.run(
        ["bash", "run_1p.sh", "bench-infer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["device"].startswith("cpu") and out["size"] == "small" and out["wall_s"] > 0
    assert out["speed"].keys() == {"r18_128x256", "r18_64x128", "r50_128x256", "r50_64x128"}
    for speed in out["speed"].values():
        assert abs(speed["fps"] - 1000 / speed["latency_ms"]) < 0.05 * speed["fps"] and speed[
            "best_batch"
        ] in (1, 2)
        assert speed["best_batch_fps"] >= speed["fps"] and speed["precision"] == CPU_O1
    # CPU: no compile variants unless asked for; bf16 only where it is native (the default is then
    # bf16 too)
    assert out["variants"].keys() == (
        {"default", "bf16"} if CPU_O1 == "bf16 autocast" else {"default"}
    )
    assert (
        all(v["fps"] > 0 and v["warmup_s"] > 0 for v in out["variants"].values())
        and out["variants"]["default"]["precision"] == CPU_O1
    )
    val = out["val"]
    assert val["images"] == 4 and val["mode"] == "ss whole" and val["precision"] == CPU_O1
    assert 0 < val["data_s"] + val["model_s"] <= val["eval_s"] <= val["process_wall_s"]
    assert abs(val["images_per_s"] - val["images"] / val["eval_s"]) < 0.01 * val["images_per_s"]
    # the agreement is recomputed here from the predictions evaluate.py wrote
    from PIL import Image

    maps = {
        amp: [np.array(Image.open(p)) for p in sorted((tmp_path / f"pred_{amp}").rglob("*.png"))]
        for amp in ("O0", "O1")
    }
    assert len(maps["O0"]) == 4 and 0.9 <= val["class_map_agreement"] <= 1
    assert val["class_map_agreement"] == round(
        float(np.mean([(a == b).mean() for a, b in zip(maps["O0"], maps["O1"])])), 6
    )


def test_learning_benchmark_gives_each_mean_with_its_standard_error():
    """tools/benchmark_learning.py: at the iterations every seed reached, the mean and scipy's
    standard error of it."""
    from scipy.stats import sem

    from benchmark_learning import curve_summary

    curves = {
        0: {100: 68.54, 200: 86.73, 300: 88.11},
        1: {100: 66.70, 200: 87.45},
        2: {100: 47.48, 200: 80.77, 300: 85.77},
    }
    mean, error = curve_summary(curves)
    assert list(mean) == list(error) == [100, 200]  # seed 1 stopped before 300
    for it in (100, 200):
        values = [curve[it] for curve in curves.values()]
        assert mean[it] == round(float(np.mean(values)), 2) and error[it] == round(
            float(sem(values)), 2
        )
    assert curve_summary({5: {100: 50.0}}) == ({100: 50.0}, {})  # one seed: no error to give


@pytest.mark.slow
def test_a_command_that_times_out_is_killed_with_everything_it_started():
    """As when torchrun hangs: killing the launcher alone would leave its train.py running."""
    from benchmark import run_json

    launcher = (
        "import subprocess, sys, time; worker = subprocess.Popen([sys.executable, '-c', 'import "
        "time; time.sleep(60)']); "
    )
    launcher += "print(worker.pid, flush=True); time.sleep(60)"
    summary, output = run_json([sys.executable, "-c", launcher], timeout=3)
    assert summary is None and output.startswith(f"timed out after 3 s: {sys.executable} -c ")
    worker = output.splitlines()[1]
    status = f"/proc/{worker}/status"
    assert (
        not os.path.exists(status) or "State:\tZ" in open(status).read()
    )  # gone, or dead and not yet reaped
