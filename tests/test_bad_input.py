"""Bad input is one line, never a traceback: flags out of range, unreadable files, work dirs that
cannot be written and backends that do not exist each end with an exit code and one line naming the
flag or file and what to do."""

import shutil
import sys

import pytest
import torch
from conftest import in_process_error, one_line_error
from test_safety import QUICK, in_small_filesystem
from test_train import SMALL, run_train

import evaluate
import export
import train
from benchmark import free_port
from bisenet import BiSeNetV1, ModelConfig


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop", "0x0"], "argument --crop: '0x0': both sides must be >= 1"),
        (["--crop", "abc"], "argument --crop: 'abc': expected HxW"),
        (["--val-interval", "0"], "argument --val-interval: '0': must be >= 1"),
        (["--ckpt-interval", "0"], "argument --ckpt-interval: '0': must be >= 1"),
        (["--log-interval", "0"], "argument --log-interval: '0': must be >= 1"),
        (["--iters", "0"], "argument --iters: '0': must be >= 1"),
        (["--iters", "-5"], "argument --iters: '-5': must be >= 1"),
        (["--lr", "-1"], "argument --lr: '-1': must be a finite number > 0"),
        (["--lr", "0"], "argument --lr: '0': must be a finite number > 0"),
        (["--lr", "nan"], "argument --lr: 'nan': must be a finite number > 0"),
        (["--lr", "inf"], "argument --lr: 'inf': must be a finite number > 0"),
        (["--workers", "-1"], "argument --workers: '-1': must be >= 0"),
        (["--num-classes", "0"], "argument --num-classes: '0': must be between 2 and 255"),
        (["--num-classes", "1"], "argument --num-classes: '1': must be between 2 and 255"),
        (["--dropout", "2"], "argument --dropout: '2': must be a finite number >= 0 and < 1"),
        (
            ["--ohem-thresh", "0"],
            "argument --ohem-thresh: '0': must be a finite number > 0 and <= 1",
        ),
        (
            ["--scale-range", "2,0.5"],
            "argument --scale-range: 2,0.5: the smaller ratio comes first",
        ),
        (
            ["--scale-range", "0.5"],
            "argument --scale-range: '0.5': expected 2 comma-separated positive numbers",
        ),
        (["--min-lr", "0.5", "--lr", "0.1"], "argument --min-lr: 0.5 is above --lr 0.1"),
        (["--keep-checkpoints", "-1"], "argument --keep-checkpoints: '-1': must be >= 0"),
        (["--iters", "x"], "argument --iters: 'x' is not an integer"),
        (["--loss-scale", "0"], "argument --loss-scale: '0': must be a finite number > 0"),
        (
            ["--loss-scale", "128", "--amp", "O0"],
            "--loss-scale 128: this run computes in fp32, which has no loss scaling; leave "
            "--loss-scale out",
        ),
    ],
)
def test_bad_training_flags_give_one_line(capsys, flags, message):
    assert message in in_process_error(train.main, flags, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--data-root", "/nonexistent/cityscapes"],
            "/nonexistent/cityscapes: data root not found",
        ),
        (["--device", "npu"], "--device npu needs torch_npu"),
        (["--device", "cuda"], "--device cuda: no CUDA device"),
        (["--batch-size", "1"], "--batch-size >= 2"),
        (["--crop", "512x1024"], "--crop 512x1024 is larger than the 128x256 images"),
        (["--num-classes", "7"], "--num-classes 7: "),
    ],
)
def test_settings_the_data_or_device_cannot_meet_give_one_line(
    synthetic_root, tmp_path, extra, message
):
    args = [
        "--data-root",
        synthetic_root,
        *SMALL,
        "--iters",
        "2",
        "--no-validate",
        "--work-dir",
        tmp_path / "wd",
        *extra,
    ]
    assert message in one_line_error(run_train(args))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scales", ""], "argument --scales: '': expected comma-separated positive numbers"),
        (["--scales", "0"], "argument --scales: '0': expected comma-separated positive numbers"),
        (["--scales", "-1"], "argument --scales: '-1': expected comma-separated positive numbers"),
        (["--stride", "0x0"], "argument --stride: '0x0': both sides must be >= 1"),
        (["--out-dir", "README.md"], "argument --out-dir: README.md is a file"),
    ],
)
def test_bad_evaluation_flags_give_one_line(capsys, flags, message):
    assert message in in_process_error(evaluate.main, flags, capsys)


def test_bad_inference_benchmark_flags_give_one_line(capsys):
    import benchmark_inference

    assert "argument --runs: '0': must be >= 1" in in_process_error(
        benchmark_inference.main, ["--runs", "0"], capsys
    )


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    model = BiSeNetV1(ModelConfig(18))
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict()}, path)
    return path


def test_bad_export_flags_give_one_line(capsys, small_checkpoint, tmp_path):
    ckpt = str(small_checkpoint)
    assert "argument --size: 'abc': expected HxW" in in_process_error(
        export.main, ["--ckpt", ckpt, "--size", "abc"], capsys
    )
    assert "argument --opset: '5': must be >= 11" in in_process_error(
        export.main, ["--ckpt", ckpt, "--opset", "5"], capsys
    )
    last = in_process_error(
        export.main, ["--ckpt", ckpt, "--out", str(tmp_path / "missing" / "m.onnx")], capsys
    )
    assert (
        f"argument --out: cannot write {tmp_path / 'missing' / 'm.onnx'} (its folder is missing "
        "or read-only)" in last
    )


def test_non_finite_weights_are_refused_on_load(capsys, small_checkpoint, tmp_path, synthetic_root):
    checkpoint = torch.load(small_checkpoint, weights_only=True)
    checkpoint["model"]["head.classifier.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    last = in_process_error(
        evaluate.main,
        [
            "--ckpt",
            str(tmp_path / "nan.pth"),
            "--data-root",
            str(synthetic_root),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert (
        "nan.pth: 1 weight tensors hold NaN or inf (first: head.classifier.weight); it comes "
        "from a diverged run" in last
    )


def test_an_empty_checkpoint_file_is_named(capsys, tmp_path, synthetic_root):
    (tmp_path / "empty.pth").write_bytes(b"")
    last = in_process_error(
        evaluate.main,
        [
            "--ckpt",
            str(tmp_path / "empty.pth"),
            "--data-root",
            str(synthetic_root),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert f"{tmp_path / 'empty.pth'}: not a loadable PyTorch checkpoint" in last


def test_bad_runs_give_one_line(capsys, synthetic_root, tmp_path, monkeypatch):
    base = ["--data-root", str(synthetic_root), *QUICK, "--iters", "1"]
    (tmp_path / "file").write_text("not a folder")
    last = in_process_error(train.main, [*base, "--work-dir", str(tmp_path / "file")], capsys)
    assert f"{tmp_path / 'file'}: cannot write to the work dir" in last
    last = in_process_error(
        train.main,
        [
            *base,
            "--work-dir",
            str(tmp_path / "wd"),
            "--pretrained",
            "http://127.0.0.1:9/resnet18.pth",
        ],
        capsys,
    )
    assert "http://127.0.0.1:9/resnet18.pth: could not download the backbone weights" in last

    broken = tmp_path / "broken"
    shutil.copytree(synthetic_root, broken)
    first = sorted((broken / "leftImg8bit" / "train").rglob("*.png"))[0]
    first.write_bytes(b"not a png")
    (broken / "train.txt").unlink(missing_ok=True)
    last = in_process_error(
        train.main,
        ["--data-root", str(broken), *QUICK, "--work-dir", str(tmp_path / "wd2")],
        capsys,
    )
    assert f"{first}: unreadable image" in last

    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DIST_BACKEND": "bogus",
    }.items():
        monkeypatch.setenv(name, value)
    last = in_process_error(train.main, [*base, "--work-dir", str(tmp_path / "wd3")], capsys)
    assert "DIST_BACKEND='bogus': expected one of nccl, hccl, gloo, mpi, ucc" in last


@pytest.mark.slow
def test_a_read_only_work_dir_gives_one_line(synthetic_root, tmp_path):
    mount = tmp_path / "ro"
    args = [
        sys.executable,
        "train.py",
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "1",
        "--work-dir",
        str(mount / "wd"),
    ]
    last = one_line_error(in_small_filesystem(mount, 1, args, read_only=True))
    assert f"{mount / 'wd'}: cannot write to the work dir (Read-only file system)" in last
