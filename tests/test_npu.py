"""The Ascend path's decisions, on a host without an NPU: tests/npu_stand_in/torch_npu pretends to
be torch_npu (chip, count, bf16 support, version, NpuFusedSGD, its GradScaler's state), put on
sys.path by the tests that need it. Only decision logic is checked here; nothing has run on Ascend
hardware."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

from bisenet import BiSeNetV1, ModelConfig
from device import Runtime, choose_device, cpu_share, npu_option_error
from train import segmentation_loss, train_step

STAND_IN = ROOT / "tests" / "npu_stand_in"


def on_ascend_host(code, **env):
    """Runs python code in a fresh interpreter that finds the stand-in torch_npu; its last stdout
    line is JSON."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(STAND_IN), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_script(args, **env):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STAND_IN), str(ROOT)]), **env}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=environment)


def test_auto_never_imports_torch_npu_where_it_is_not_installed():
    assert importlib.util.find_spec("torch_npu") is None  # this machine has no torch_npu
    kind, why = choose_device("auto")
    assert (
        kind == ("cuda" if torch.cuda.is_available() else "cpu")
        and "torch_npu is not installed" in why
    )
    assert "torch_npu" not in sys.modules


@pytest.mark.slow
@pytest.mark.parametrize("count, expected", [("8", "npu"), ("0", "cpu")])
def test_auto_picks_an_npu_that_torch_npu_sees_and_says_why(count, expected):
    picked = on_ascend_host(
        """
        import json, device
        runtime = device.setup_runtime("auto")
        print(json.dumps([runtime.device.type, runtime.device_note]))
        """,
        STAND_IN_NPU_COUNT=count,
    )
    if expected == "npu":
        assert picked == [
            "npu",
            "device: npu:0, Ascend910B3 (--device auto: torch_npu sees 8 NPUs)",
        ]
    else:
        assert picked[0] == "cpu" and "torch_npu sees 0 NPUs" in picked[1]


@pytest.mark.slow
def test_train_prints_the_device_first_and_refuses_bf16_on_a_910a(tmp_path):
    result = run_script(
        [sys.executable, "train.py", "--amp-dtype", "bfloat16", "--work-dir", str(tmp_path / "wd")],
        STAND_IN_NPU_CHIP="Ascend910A",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --amp-dtype bfloat16: this Ascend910A has no bf16 "
        "(torch.npu.is_bf16_supported() is False) and would train in fp32; "
        "leave --amp-dtype out (fp16 with loss scaling)"
    ]
    chosen = on_ascend_host(
        """
        import json, device
        runtime = device.setup_runtime("npu", amp_dtype="bfloat16")
        default = device.setup_runtime("npu")
        scaled = default.grad_scaler("O1").is_enabled()
        print(json.dumps([runtime.precision("O1"), default.precision("O1"), scaled]))
        """
    )
    assert chosen == [
        "bf16 autocast",
        "fp16 autocast",
        True,
    ]  # a 910B has bf16; the default stays apex O1's fp16


@pytest.mark.slow
def test_npu_trains_with_npu_fused_sgd_cleared_in_place(tmp_path):
    """NpuFusedSGD refuses zero_grad(set_to_none=True); train_step leaves the choice to each
    optimizer, so the same step gives torch's SGD update on the CPU."""
    saved = str(tmp_path / "fused.pt")
    result = on_ascend_host(
        f"""
        import json, torch, torch_npu, device
        from bisenet import BiSeNetV1, ModelConfig
        from train import segmentation_loss, train_step
        kernel = device.Runtime(torch.device("npu", 0)).sgd_kernel
        torch.manual_seed(0)
        model = BiSeNetV1(ModelConfig(18, 4, dropout=0.0)).train()
        optimizer = device.sgd(
            model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, kernel=kernel
        )
        images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
        labels = torch.randint(0, 4, (2, 32, 64))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = dict(scaler=scaler, images=images, labels=labels, loss_fn=segmentation_loss)
        fp32 = lambda: torch.autocast("cpu", enabled=False)
        for _ in range(2):
            train_step(model, optimizer, **step, autocast=fp32)
        torch.save(model.state_dict(), {saved!r})
        print(json.dumps([kernel, type(optimizer).__name__]))
        """
    )
    assert result == ["npu-fused", "NpuFusedSGD"]
    fused = torch.load(tmp_path / "fused.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as in the child: another thread count sums the convolutions in another order
    try:
        torch.manual_seed(0)
        model = BiSeNetV1(ModelConfig(18, 4, dropout=0.0)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        images, labels = (
            torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8),
            torch.randint(0, 4, (2, 32, 64)),
        )
        for _ in range(2):
            train_step(
                model,
                optimizer,
                scaler=torch.amp.GradScaler("cpu", enabled=False),
                images=images,
                labels=labels,
                loss_fn=segmentation_loss,
                autocast=lambda: torch.autocast("cpu", enabled=False),
            )
    finally:
        torch.set_num_threads(threads)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fused[name], value, msg=name)
    without = on_ascend_host(
        "import json, torch, torch_npu, device; "
        "print(json.dumps(device.Runtime(torch.device('npu', 0)).sgd_kernel))",
        STAND_IN_NO_FUSED_SGD="1",
    )
    assert without == "default"  # a torch_npu without NpuFusedSGD: torch's SGD


@pytest.mark.slow
def test_scaler_state_moves_between_npu_and_other_devices_with_its_scale():
    cpu_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=50)
    cpu_scaler.scale(torch.ones(()))  # creates the scale and growth tracker, as the first step does
    saved_on_cpu = cpu_scaler.state_dict()
    assert "dynamic" not in saved_on_cpu
    on_npu = on_ascend_host(
        f"""
        import json, torch, torch_npu, device
        runtime = device.Runtime(torch.device("npu", 0))
        scaler = runtime.grad_scaler("O1")
        runtime.load_scaler_state(scaler, {saved_on_cpu!r})
        print(json.dumps(scaler.state_dict()))
        """
    )
    assert on_npu == {**saved_on_cpu, "dynamic": True}  # without the conversion: KeyError 'dynamic'
    back = torch.amp.GradScaler("cpu", enabled=True)
    Runtime(torch.device("cpu"), amp_dtype=torch.float16).load_scaler_state(
        back, {**on_npu, "scale": 128.0}
    )
    assert back.get_scale() == 128.0 and back.state_dict() == {**saved_on_cpu, "scale": 128.0}


@pytest.mark.parametrize(
    "version, triton, compile, channels_last, message",
    [
        (
            "2.1.0.post3",
            True,
            True,
            None,
            "--compile: torch_npu 2.1.0.post3 has no torch.compile backend",
        ),
        ("2.6.0", False, True, None, "--compile: torch_npu 2.6.0 has no torch.compile backend"),
        ("2.6.0rc1", True, True, None, None),
        (
            "2.6.0",
            True,
            False,
            True,
            "--channels-last: torch_npu picks its own internal memory formats",
        ),
        ("2.6.0", True, False, False, None),
    ],
)
def test_npu_options_refused_where_torch_npu_cannot_run_them(
    version, triton, compile, channels_last, message
):
    error = npu_option_error(
        compile=compile,
        channels_last=channels_last,
        torch_npu_version=version,
        triton_installed=triton,
    )
    assert (error is None) if message is None else error.startswith(message)


@pytest.mark.slow
def test_train_refuses_compile_on_an_old_torch_npu_in_one_line(tmp_path):
    result = run_script(
        [sys.executable, "train.py", "--compile", "--work-dir", str(tmp_path / "wd")]
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --compile: torch_npu 2.1.0.post3 has no torch.compile backend")
    )
    assert (
        result.stdout.splitlines()[0]
        == "device: npu:0, Ascend910B3 (--device auto: torch_npu sees 8 NPUs)"
    )


def test_each_rank_takes_its_own_share_of_the_cores():
    cpus = {7, 0, 3, 1, 2, 6, 5, 4, 8}
    shares = [cpu_share(cpus, rank, 4) for rank in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cpu_share({0, 1}, 1, 8) == [0, 1]  # fewer cores than ranks: all of them


@pytest.mark.slow
def test_the_metric_is_counted_on_the_host_for_npus_and_pinned_memory_is_used():
    npu = on_ascend_host(
        """
        import json, torch, torch_npu, device
        r = device.Runtime(torch.device("npu", 0))
        pinning = [r.pin_memory, r.pin_memory_device]
        layout = [str(r.memory_format), r.prefers_channels_last]
        print(json.dumps([str(r.metric_device), *pinning, *layout]))
        """
    )
    assert npu == [
        "cpu",
        True,
        "npu" if not hasattr(torch, "accelerator") else "",
        "torch.contiguous_format",
        False,
    ]
    cuda = Runtime(torch.device("cuda", 0))
    assert (str(cuda.metric_device), cuda.pin_memory) == ("cuda:0", True)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_1p.sh", "run_8p.sh"])
def test_launch_scripts_reach_the_npu_on_an_ascend_host(script):
    command = run_script(["bash", script, "full"], DRY_RUN="1", DIST_TIMEOUT="600")
    assert command.returncode == 0, command.stderr
    assert " train.py --device npu " in command.stdout
    if script == "run_8p.sh":
        assert (
            command.stdout.startswith("HCCL_CONNECT_TIMEOUT=600 ")
            and "--nproc-per-node 8" in command.stdout
        )
        kept = run_script(["bash", script, "full"], DRY_RUN="1", HCCL_CONNECT_TIMEOUT="900")
        assert kept.stdout.startswith("HCCL_CONNECT_TIMEOUT=900 ")
    override = run_script(["bash", script, "full"], DRY_RUN="1", DEVICE="cpu")
    assert " train.py --device cpu " in override.stdout
    plain = subprocess.run(
        ["bash", script, "full"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1"},
    )
    assert f" train.py --device {'cuda' if torch.cuda.is_available() else 'cpu'} " in plain.stdout


@pytest.mark.slow
def test_r18_on_several_devices_keeps_16_images_in_all_or_refuses():
    for nproc, batch in (("1", 16), ("2", 8), ("4", 4), ("8", 2)):
        command = run_script(
            ["bash", "run_8p.sh", "full"], DRY_RUN="1", DEPTH="18", NPROC=nproc, DEVICE="cpu"
        )
        assert json.loads(command.stdout.strip().splitlines()[-1])["batch_size"] == batch, (
            command.stderr
        )
    for nproc in ("3", "6", "16"):
        refused = run_script(
            ["bash", "run_8p.sh", "full"], DRY_RUN="1", DEPTH="18", NPROC=nproc, DEVICE="cpu"
        )
        assert refused.returncode == 2 and refused.stderr.startswith(
            f"error: --recipe mmseg_r18 trains 16 images in all; {nproc} devices"
        )


@pytest.mark.slow
def test_a_static_loss_scale_skips_overflowing_steps_and_keeps_its_scale(synthetic_root, tmp_path):
    """--loss-scale N (Ascend's port: 128): fp16 as on an NPU, on the CPU. A scale that overflows
    every fp16 gradient: each step is skipped, and the scale stays N (a dynamic one would halve it
    each time)."""
    args = [
        "--data-root",
        str(synthetic_root),
        "--depth",
        "18",
        "--batch-size",
        "2",
        "--crop",
        "32x64",
        "--workers",
        "0",
        "--iters",
        "3",
    ]
    args += [
        "--no-validate",
        "--amp-dtype",
        "float16",
        "--loss-scale",
        str(2.0**100),
        "--work-dir",
        str(tmp_path / "wd"),
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "fp16 gradients overflowed, step skipped, loss scale 1.26765e+30 -> 1.26765e+30"
        in result.stderr + result.stdout
    )
    overflows = [
        e
        for e in map(json.loads, (tmp_path / "wd" / "log.jsonl").read_text().splitlines())
        if e.get("overflow")
    ]
    assert [e["iter"] for e in overflows] == [1, 2, 3] and all(
        e["loss_scale"] == 2.0**100 for e in overflows
    )
    saved = torch.load(tmp_path / "wd" / "iter_3.pth", weights_only=True)
    assert saved["scaler"]["scale"] == 2.0**100 and saved["scaler"]["growth_interval"] == 2**31 - 1
    assert not saved["optimizer"]["state"]  # no step was taken
