"""A run's history and identity: the checkpoint is written before the validation that may fail,
an earlier run's log and pictures are never cut, a resumed run keeps the inputs it began with
(class weights, label statistics read by their contents), a garbled log or cache never stops it,
every exit ends within seconds, any file name is read, and one checkpoint gives one number."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, copy_of, in_process, in_process_error, in_process_summary, one_line_error
from PIL import Image
from test_train import SMALL

import train

QUICK = [*SMALL, "--warmup-iters", "0", "--lr", "0.01"]


def untrained_checkpoint(path):
    """An R18 checkpoint of freshly initialised weights, as evaluate.py and export.py read it."""
    from bisenet import BiSeNetV1, ModelConfig

    model = BiSeNetV1(ModelConfig(18, 19))
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict()}, path)
    return path


def break_val_label(root, value=99):
    """Writes an out-of-range value into the first val label: validation fails on it with one
    line."""
    label = sorted(root.glob("gtFine/val/*/*_labelTrainIds.png"))[0]
    pixels = np.array(Image.open(label))
    pixels[0, 0] = value
    Image.fromarray(pixels).save(label)
    return label


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_interval", [2, 4])
def test_a_failing_validation_never_costs_the_checkpoint(
    synthetic_root, tmp_path, capsys, ckpt_interval
):
    """Validation at iteration 2 fails on a bad val label; with a checkpoint due there (2) or not
    (4), the iteration reached is saved before the run exits."""
    data = copy_of(synthetic_root, tmp_path)
    break_val_label(data)
    flags = ["--data-root", data, "--work-dir", tmp_path / "wd", *QUICK, "--iters", "4"]
    flags += ["--val-interval", "2", "--ckpt-interval", str(ckpt_interval)]
    last = one_line_error(in_process("train.py", *flags))
    assert "label values [99]" in last
    assert (tmp_path / "wd" / "iter_2.pth").is_file()
    assert torch.load(tmp_path / "wd" / "iter_2.pth", weights_only=True)["iteration"] == 2


@pytest.mark.slow
def test_a_fresh_run_sets_an_earlier_runs_log_and_pictures_aside(synthetic_root, tmp_path, capsys):
    work_dir = tmp_path / "wd"
    flags = ["--data-root", synthetic_root, "--work-dir", work_dir, *QUICK, "--no-validate"]
    in_process_summary(train.main, [*flags, "--iters", "3"], capsys)
    earlier = (work_dir / "log.jsonl").read_bytes()
    (work_dir / "curves.png").write_bytes(b"an earlier picture")
    for checkpoint in work_dir.glob("*.pth"):  # the user moves the checkpoints away, keeps the rest
        checkpoint.rename(tmp_path / checkpoint.name)
    in_process_summary(train.main, [*flags, "--iters", "2"], capsys)
    assert (work_dir / "earlier_run_1" / "log.jsonl").read_bytes() == earlier
    assert (work_dir / "earlier_run_1" / "curves.png").read_bytes() == b"an earlier picture"
    assert [
        json.loads(line).get("iter") for line in (work_dir / "log.jsonl").read_text().splitlines()
    ][-1] == 2


@pytest.mark.slow
def test_resume_refuses_an_edited_class_weight_file_and_keeps_auto_weights(
    synthetic_root, tmp_path, capsys
):
    weights = tmp_path / "weights.txt"
    weights.write_text(" ".join(["1"] * 19))
    flags = ["--data-root", synthetic_root, "--work-dir", tmp_path / "wd", *QUICK, "--no-validate"]
    in_process_summary(train.main, [*flags, "--iters", "2", "--class-weight", weights], capsys)
    weights.write_text(" ".join(["2"] * 19))
    last = in_process_error(
        train.main, [*flags, "--iters", "4", "--resume", "--class-weight", weights], capsys
    )
    assert last.startswith(f"error: --class-weight {weights}: changed since the run began")

    data = copy_of(synthetic_root, tmp_path)
    auto = [
        "--data-root",
        data,
        "--work-dir",
        tmp_path / "auto",
        *QUICK,
        "--no-validate",
        "--class-weight",
        "auto",
    ]
    in_process_summary(train.main, [*auto, "--iters", "2"], capsys)
    began = torch.load(tmp_path / "auto" / "iter_2.pth", weights_only=True)["args"]["class_weights"]
    for label in data.glob("gtFine/train/*/*_labelTrainIds.png"):  # the labels change mid-run
        Image.fromarray(np.zeros_like(np.array(Image.open(label)))).save(label)
    in_process_summary(train.main, [*auto, "--iters", "4", "--resume"], capsys)
    assert (
        torch.load(tmp_path / "auto" / "iter_4.pth", weights_only=True)["args"]["class_weights"]
        == began
    )


def test_the_label_histogram_cache_reads_contents_and_rebuilds_when_garbled(
    synthetic_root, tmp_path
):
    """A label rewritten with its size and time kept (uncompressed PNGs of one size) is read
    again; a cache that does not parse is rebuilt."""
    from cityscapes import open_dataset
    from datasets import label_histogram, training_label_counts

    data = copy_of(synthetic_root, tmp_path)
    dataset = open_dataset(data, "train")
    label = dataset.samples[0][1]
    pixels = np.array(Image.open(label))
    Image.fromarray(pixels).save(label, compress_level=0)
    cache, said = tmp_path / "label_histogram.json", []
    first = training_label_counts(dataset, cache, source=data, processes=1, log=said.append)
    stat = label.stat()
    Image.fromarray(np.where(pixels == 255, 255, 0).astype(np.uint8)).save(label, compress_level=0)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert label.stat().st_size == stat.st_size
    again = training_label_counts(dataset, cache, source=data, processes=1, log=said.append)
    assert np.array_equal(again, label_histogram(dataset, 1)) and not np.array_equal(again, first)
    cache.write_text('{"key": "x", "pix')
    rebuilt = training_label_counts(dataset, cache, source=data, processes=1, log=said.append)
    assert np.array_equal(rebuilt, again)


@pytest.mark.slow
def test_resume_skips_a_garbled_log_line_with_a_note(synthetic_root, tmp_path, capsys):
    work_dir = tmp_path / "wd"
    flags = ["--data-root", synthetic_root, "--work-dir", work_dir, *QUICK, "--no-validate"]
    in_process_summary(train.main, [*flags, "--iters", "2"], capsys)
    garbled = len((work_dir / "log.jsonl").read_text().splitlines()) + 1
    with open(work_dir / "log.jsonl", "a") as log:
        log.write("{not json\n")
    (work_dir / "label_histogram.json").write_text("[1, 2")
    train.main([str(a) for a in [*flags, "--iters", "3", "--resume"]])
    said = capsys.readouterr().out
    assert json.loads(said.strip().splitlines()[-1])["iters"] == 3
    assert f"skipped 1 garbled lines (first: line {garbled})" in said


@pytest.mark.slow
@pytest.mark.parametrize("script", ["evaluate.py", "tools/deploy.py"])
def test_a_one_line_error_in_a_loader_worker_ends_the_script(synthetic_root, tmp_path, script):
    """A bad val label, read by a DataLoader worker: the script says it and exits (it used to
    wait forever on workers that ignore SIGTERM)."""
    data = copy_of(synthetic_root, tmp_path)
    break_val_label(data)
    checkpoint = untrained_checkpoint(tmp_path / "model.pth")
    model_flag = ["--ckpt", checkpoint]
    if script == "tools/deploy.py":  # an exported model, read by ONNX Runtime
        exported = tmp_path / "model.onnx"
        export = [sys.executable, "tools/export.py", "--ckpt", checkpoint, "--out", exported]
        export += ["--format", "onnx", "--size", "128x256"]
        subprocess.run(
            list(map(str, export)), cwd=ROOT, check=True, capture_output=True, timeout=600
        )
        model_flag = ["--model", exported]
    command = [sys.executable, script, *model_flag, "--data-root", data, "--workers", "2"]
    result = subprocess.run(
        list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "label values [99]" in one_line_error(result)


@pytest.mark.slow
def test_file_names_that_are_not_utf8_are_read(tmp_path):
    """cv2.imread crashed (segfault) on such names; Python reads them, and they print."""
    from datasets import read_image

    folder = Path(os.fsdecode(bytes(tmp_path / "images") + b"/\xff\xfe"))
    folder.mkdir(parents=True)
    image = folder / os.fsdecode(b"\xe9t\xe9.png")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    assert np.array_equal(read_image(image), pixels)
    code = "import sys, cli, datasets; cli.main(datasets.read_image, sys.argv[1])"
    missing = os.fsencode(folder / "gone.png")
    result = subprocess.run(
        [sys.executable, "-c", code, missing], cwd=ROOT, capture_output=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.decode().startswith("error: ")
    checkpoint = untrained_checkpoint(tmp_path / "model.pth")
    flags = ["--ckpt", checkpoint, "--images", tmp_path / "images", "--out-dir", tmp_path / "out"]
    segmented = subprocess.run(
        [sys.executable, "evaluate.py", *map(os.fsencode, flags), b"--workers", b"0"],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert segmented.returncode == 0, segmented.stderr[-2000:]
    written = list((tmp_path / "out").rglob("*.png"))
    assert [os.fsencode(p.name) for p in written] == [b"\xe9t\xe9_color.png"]


@pytest.mark.slow
def test_a_stop_signal_before_the_first_step_ends_the_run_with_its_line(synthetic_root, tmp_path):
    command = [
        sys.executable,
        "train.py",
        "--data-root",
        synthetic_root,
        "--work-dir",
        tmp_path / "wd",
        *QUICK,
    ]
    command += ["--iters", "50", "--no-validate"]
    process = subprocess.Popen(
        list(map(str, command)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:  # the run has started once it says what it trains on
        lines.append(line)
        if line.startswith("dataset: "):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines)
    assert lines[-1].startswith("error: stopped by SIGTERM"), "".join(lines)


@pytest.mark.slow
def test_the_last_validation_and_evaluate_py_give_one_number(learned, capsys):
    import evaluate

    data, work_dir, finished = learned
    trained = json.loads(finished.stdout.strip().splitlines()[-1])
    scored = in_process_summary(
        evaluate.main,
        ["--ckpt", work_dir / "latest.pth", "--data-root", data, "--workers", "0"],
        capsys,
    )
    assert scored["mIoU"] == trained["mIoU"]


def test_help_shows_every_default_in_groups_of_their_own(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    titles = [
        line
        for line in text.splitlines()
        if line and not line.startswith(" ") and line.endswith(":")
    ]
    assert len(titles) == len(set(titles)), titles
    for flag in ("--data-root", "--crop", "--workers", "--work-dir", "--seed", "--val-interval"):
        entry = text[text.index(f"  {flag}") :].split("\n  -", 1)[0]
        assert re.search(r"\(default:\s", entry), entry


@pytest.mark.slow
def test_run_8p_without_data_says_one_line(tmp_path):
    environment = {
        **os.environ,
        "DATA_ROOT": str(tmp_path / "nowhere"),
        "NPROC": "2",
        "DEVICE": "cpu",
    }
    result = subprocess.run(
        ["bash", "run_8p.sh", "full"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "data root not found" in one_line_error(result)


def test_the_demo_summary_says_when_nothing_was_left_to_train(tmp_path):
    text = (ROOT / "run_1p.sh").read_text()
    script = text[text.index("<<'PY'\n") + 7 : text.index("\nPY\n")]
    for name, entry in {
        "train": {"train_fps": None, "precision": "fp32", "checkpoint": "c"},
        "eval": {"mIoU": 41.9, "mode": "ss whole"},
        "bench": {"fps": 50.0, "size": "128x256", "precision": "fp32", "device": "cpu"},
    }.items():
        (tmp_path / f"{name}.out").write_text(json.dumps(entry) + "\n")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "predictions")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "None img/s" not in result.stdout, (
        result.stdout + result.stderr
    )
    assert "nothing left to train" in result.stdout
