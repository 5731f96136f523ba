"""tools/check_dataset.py against counts made here independently (PIL and numpy over the label
files)."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, in_process, last_json, one_line_error
from PIL import Image

import cityscapes
import interop
import synthetic

CAMVID_VOID = 11


def independent_counts(pairs, num_classes, void=None):
    """Pixels per class of the label files, read with PIL alone (void folded into 255)."""
    counts = np.zeros(256, np.int64)
    for _, label in pairs:
        values = np.array(Image.open(label)).ravel()
        counts += np.bincount(
            np.where(values == void, 255, values) if void is not None else values, minlength=256
        )
    return counts[:num_classes].tolist()


@pytest.mark.parametrize("layout", ["cityscapes", "mmseg", "list", "camvid"])
def test_check_counts_every_class_and_draws_the_pictures(layout, synthetic_root, tmp_path):
    if layout == "cityscapes":
        root = synthetic_root
    else:
        root = synthetic.synthesize_folder(
            tmp_path / "data",
            classes=5,
            train=6,
            val=2,
            height=64,
            width=128,
            layout=layout,
            seed=4,
        )
    result = in_process(
        "tools/check_dataset.py",
        root,
        "--out",
        tmp_path / "report",
        "--samples",
        "2",
        "--nproc",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)

    for split in ("train", "val"):
        dataset = cityscapes.open_dataset(root, split)
        counts = independent_counts(
            dataset.samples, dataset.info.num_classes, CAMVID_VOID if layout == "camvid" else None
        )
        part = summary["splits"][split]
        assert list(part["pixels"].values()) == counts and part["images"] == len(dataset)
        assert part["absent"] == [
            name for name, count in zip(dataset.info.class_names, counts) if count == 0
        ]
        with Image.open(tmp_path / "report" / f"samples_{split}.png") as picture:
            assert picture.width > 400 and picture.height > 200
    images = [
        np.array(Image.open(image).convert("RGB"), np.float64).reshape(-1, 3)
        for image, _ in cityscapes.open_dataset(root, "train").samples
    ]
    pixels = np.concatenate(images)
    assert np.allclose(summary["rgb_mean"], pixels.mean(0), atol=0.01) and np.allclose(
        summary["rgb_std"], pixels.std(0), atol=0.01
    )
    with Image.open(tmp_path / "report" / "class_pixels.png") as chart:
        assert chart.width >= 600


def test_check_names_a_broken_file_and_goes_on(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    broken = sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    result = in_process(
        "tools/check_dataset.py",
        root,
        "--out",
        tmp_path / "report",
        "--samples",
        "0",
        "--nproc",
        "1",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {broken}: unreadable label PNG" in result.stderr
    assert last_json(result.stdout)["splits"]["val"]["broken"] == [
        f"{broken}: unreadable label PNG; re-create or re-convert it"
    ]


def test_check_explains_masks_of_0_and_255(tmp_path):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=2, train=2, val=1, height=64, width=128, seed=5
    )
    for label in (root / "ann_dir").rglob("*.png"):
        values = np.array(Image.open(label))
        Image.fromarray(np.where(values == 1, 255, 0).astype(np.uint8)).save(label)
    result = in_process(
        "tools/check_dataset.py",
        root,
        "--out",
        tmp_path / "report",
        "--samples",
        "0",
        "--nproc",
        "1",
    )
    info = interop.folder_info(root)
    assert f"warning: train: 1 of 2 classes never occur: {info.class_names[1]}" in result.stderr
    assert (
        "labels hold only 0 and 255, and 255 is the ignore value: "
        "if 255 marks your foreground, write it as 1" in result.stderr
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["splits"]["train"]["absent"] == [
        info.class_names[1]
    ]


def binary_masks_of_0_and_255(tmp_path):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=2, train=4, val=2, height=64, width=128, seed=5
    )
    for label in (root / "ann_dir").rglob("*.png"):
        values = np.array(Image.open(label))
        Image.fromarray(np.where(values == 1, 255, 0).astype(np.uint8)).save(label)
    return root


TINY_RUN = [
    "--depth",
    "18",
    "--batch-size",
    "2",
    "--crop",
    "64x128",
    "--iters",
    "2",
    "--workers",
    "0",
    "--warmup-iters",
    "0",
    "--val-interval",
    "2",
]


@pytest.mark.slow
def test_masks_of_0_and_255_are_refused_and_train_after_mapping(tmp_path):
    """With a 2-class classes.txt, 255 is ignored: the model would learn background only and score
    'mIoU 100'."""
    root = binary_masks_of_0_and_255(tmp_path)
    refused = in_process("train.py", "--data-root", root, "--work-dir", tmp_path / "wd", *TINY_RUN)
    name = interop.folder_info(root).class_names[1]
    command = f"python tools/map_labels.py {root} NEW_ROOT --map 255=1"
    fix = f"if 255 marks your foreground, write it as 1 into a copy: {command}"
    why = "the training labels hold only 0 and 255, and 255 is the ignore value"
    assert one_line_error(refused) == f"error: {root}: {why}, so {name!r} never occurs; {fix}"
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    mapped = in_process("tools/map_labels.py", root, tmp_path / "mapped", "--map", "255=1")
    assert mapped.returncode == 0 and last_json(mapped.stdout)["labels"] == 6, mapped.stderr
    assert {
        p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    } == before  # the user's files untouched
    for label in (root / "ann_dir").rglob("*.png"):
        original = np.array(Image.open(label))
        assert np.array_equal(
            np.array(Image.open(tmp_path / "mapped" / label.relative_to(root))),
            np.where(original == 255, 1, original),
        )
    trained = in_process(
        "train.py", "--data-root", tmp_path / "mapped", "--work-dir", tmp_path / "wd2", *TINY_RUN
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    histogram = json.loads((tmp_path / "wd2" / "label_histogram.json").read_text())["pixels"]
    assert (
        histogram[:2]
        == independent_counts(cityscapes.open_dataset(tmp_path / "mapped", "train").samples, 2)
        and histogram[1] > 0
    )


@pytest.mark.slow
def test_a_class_absent_from_the_training_labels_warns_and_the_histogram_is_reused(tmp_path):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=5, train=4, val=2, height=64, width=128, seed=6
    )
    for label in (root / "ann_dir" / "train").rglob("*.png"):
        values = np.array(Image.open(label))
        Image.fromarray(np.where(values == 3, 0, values).astype(np.uint8)).save(label)
    first = in_process("train.py", "--data-root", root, "--work-dir", tmp_path / "wd", *TINY_RUN)
    name = interop.folder_info(root).class_names[3]
    assert (
        first.returncode == 0
        and f"warning: 1 of 5 classes never occur in the training labels: {name}; " in first.stdout
    ), first.stderr[-2000:]
    assert "label histogram of 4 labels" in first.stdout
    resumed = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd",
        *TINY_RUN,
        "--iters",
        "3",
        "--resume",
    )
    assert resumed.returncode == 0 and "label histogram" not in resumed.stdout, resumed.stderr[
        -2000:
    ]
    label = sorted((root / "ann_dir" / "train").rglob("*.png"))[0]
    Image.fromarray(np.full((64, 128), 3, np.uint8)).save(
        label
    )  # a changed label file is counted again
    again = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd",
        *TINY_RUN,
        "--iters",
        "4",
        "--resume",
    )
    assert (
        again.returncode == 0
        and "label histogram of 4 labels" in again.stdout
        and "never occur" not in again.stdout
    )


@pytest.mark.slow
def test_the_label_histogram_in_several_processes_ends_every_time(synthetic_root):
    """A Pool's exit stops its workers with SIGTERM; while they ignored it (as loader workers must),
    the pool could wait for them forever and train.py hung before its first step. Ten histograms in
    2 processes, in a child that a hang cannot take the test run with, each against PIL's counts."""
    code = (
        "import json, sys; from cityscapes import open_dataset\n"
        "from datasets import label_histogram\n"
        "dataset = open_dataset(sys.argv[1], 'train')\n"
        "print(json.dumps([label_histogram(dataset, 2).tolist() for _ in range(10)]))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(synthetic_root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child, its pool's workers and the forkserver
        child.communicate()
        pytest.fail(
            "label_histogram(dataset, 2) did not return within 120 s: "
            "its pool waits for workers that ignore SIGTERM"
        )
    assert child.returncode == 0
    expected = independent_counts(cityscapes.open_dataset(synthetic_root, "train").samples, 19)
    assert [counts[:19] for counts in json.loads(out)] == [expected] * 10 and sum(expected) > 0


@pytest.mark.slow
def test_a_run_draws_its_curves_confusion_and_per_class_iou_with_evaluates_numbers(tmp_path):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=5, train=6, val=3, height=64, width=128, seed=2
    )
    run = [*TINY_RUN, "--iters", "4", "--log-interval", "1", "--amp", "O0"]
    trained = in_process("train.py", "--data-root", root, "--work-dir", tmp_path / "wd", *run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for name in ("curves.png", "confusion.png", "per_class_iou.png"):
        with Image.open(tmp_path / "wd" / name) as png:
            assert (
                png.format == "PNG" and png.width >= 400 and np.asarray(png.convert("L")).std() > 10
            ), name  # a drawing, not a blank
    validations = [
        e
        for e in map(json.loads, (tmp_path / "wd" / "log.jsonl").read_text().splitlines())
        if "val_iou" in e
    ]
    assert [e["iter"] for e in validations] == [2, 4]
    rows = list(csv.reader((tmp_path / "wd" / "confusion.csv").open()))
    names = interop.folder_info(root).class_names
    assert rows[0][1:] == list(names) and [row[0] for row in rows[1:]] == list(names)
    confusion = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert confusion.tolist() == validations[-1]["val_confusion"]
    scored = last_json(
        in_process(
            "evaluate.py",
            "--ckpt",
            tmp_path / "wd" / "iter_4.pth",
            "--data-root",
            root,
            "--amp",
            "O0",
            "--workers",
            "0",
        ).stdout
    )
    labelled = independent_counts(cityscapes.open_dataset(root, "val").samples, 5)
    assert (
        confusion.sum(1).tolist() == labelled
    )  # every labelled val pixel counted once, by its ground truth
    tp, union = np.diag(confusion), confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    for k, name in enumerate(names):
        from_csv = 100 * tp[k] / union[k] if union[k] else None
        for value in (validations[-1]["val_iou"][name], scored["per_class"][name]):
            assert (value is None) == (from_csv is None) and (
                value is None or abs(value - from_csv) < 0.05
            ), name


@pytest.mark.slow
def test_class_weight_auto_is_enets_formula_of_the_training_histogram_and_a_bad_file_is_one_line(
    tmp_path,
):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=5, train=4, val=2, height=64, width=128, seed=7
    )
    trained = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd",
        *TINY_RUN,
        "--class-weight",
        "auto",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    counts = np.array(
        independent_counts(cityscapes.open_dataset(root, "train").samples, 5), dtype=np.float64
    )
    enet = 1 / np.log(1.02 + counts / counts.sum())  # Paszke et al. 2016, ENet, section 5.2
    settings = torch.load(tmp_path / "wd" / "latest.pth", weights_only=True)["args"]
    assert settings["class_weight"] == "auto" and np.allclose(
        settings["class_weights"], enet, rtol=1e-6
    )
    (tmp_path / "w.txt").write_text("1, 2\n3")
    refused = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd2",
        *TINY_RUN,
        "--class-weight",
        tmp_path / "w.txt",
    )
    wanted = "expected 5 finite weights >= 0, not all 0 (one per class); got 3 values"
    expected = f"error: --class-weight {tmp_path / 'w.txt'}: {wanted}"
    assert one_line_error(refused) == expected
    (tmp_path / "w.txt").write_text("1 1 1 1 4\n")
    weighted = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd3",
        *TINY_RUN,
        "--class-weight",
        tmp_path / "w.txt",
    )
    assert weighted.returncode == 0 and torch.load(
        tmp_path / "wd3" / "latest.pth", weights_only=True
    )["args"]["class_weights"] == [1, 1, 1, 1, 4]


def check(root, tmp_path, *flags):
    return in_process("tools/check_dataset.py", root, "--out", tmp_path / "report", *flags)


def my3(tmp_path, **kwargs):
    """mmseg's layout: JPEG images, palette labels (read by PIL alone)."""
    return synthetic.synthesize_folder(
        tmp_path / "data", classes=3, train=3, val=1, height=32, width=48, seed=8, **kwargs
    )


@pytest.mark.parametrize("samples", ["0", "2"])
def test_an_image_and_its_label_of_different_sizes_are_a_finding(samples, tmp_path):
    root = my3(tmp_path)
    image, label = cityscapes.open_dataset(root, "train").samples[0]
    with Image.open(label) as png:
        png.resize((40, 30), Image.NEAREST).save(label)
    result = check(root, tmp_path, "--samples", samples, "--nproc", "1")
    finding = f"{label}: label is 40x30 but image {image} is 48x32"
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {finding}" in result.stderr
    train = last_json(result.stdout)["splits"]["train"]
    assert [b.split(";")[0] for b in train["broken"]] == [finding]
    others = cityscapes.open_dataset(root, "train").samples[1:]
    assert list(train["pixels"].values()) == independent_counts(others, 3)
    assert train["sizes"] == {"32x48": 2}


def not_utf8(path):
    """The path renamed to a name that is not UTF-8 (Python shows such a name with surrogates)."""
    renamed = path.with_name(os.fsdecode(b"\xff\xfe") + path.suffix)
    path.rename(renamed)
    return renamed


@pytest.mark.parametrize("nproc", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_a_file_name_that_is_not_utf8_is_read_and_drawn(nproc, tmp_path):
    """In this process, and in a child of its own (a pool, and a real stdout and stderr to print the
    name to)."""
    root = my3(tmp_path)
    image, label = cityscapes.open_dataset(root, "train").samples[0]
    not_utf8(image), not_utf8(label)
    samples = cityscapes.open_dataset(root, "train").samples
    assert any(os.fsdecode(b"\xff\xfe") in str(image) for image, _ in samples)
    args = [root, "--out", tmp_path / "report", "--samples", "3", "--nproc", nproc]
    result = (
        in_process("tools/check_dataset.py", *args)
        if nproc == "1"
        else run_with_timeout([sys.executable, "tools/check_dataset.py", *args])
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    train = last_json(result.stdout)["splits"]["train"]
    assert train["images"] == 3 and train["broken"] == []
    assert list(train["pixels"].values()) == independent_counts(samples, 3)
    with Image.open(tmp_path / "report" / "samples_train.png") as picture:
        assert picture.height > 3 * 100


def run_with_timeout(command, timeout=300):
    """command in a child that a hang cannot take the test run with: its finished process, or a
    failed test."""
    child = subprocess.Popen(
        [str(part) for part in command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child, its pool's workers and the forkserver
        child.communicate()
        pytest.fail(f"{' '.join(map(str, command))} did not end within {timeout} s")
    return subprocess.CompletedProcess(command, child.returncode, out, err)


@pytest.mark.slow
def test_a_name_that_is_not_utf8_never_hangs_the_default_pool(tmp_path):
    """A grey label goes through OpenCV, whose imread crashed on such a name: the pool's worker died
    and the pool waited for its result forever. Now the name is read, or the check ends with one
    line."""
    root = my3(tmp_path)
    image, label = cityscapes.open_dataset(root, "train").samples[0]
    with Image.open(label) as png:
        Image.fromarray(np.array(png)).save(label)  # palette indices -> grey
    not_utf8(image), not_utf8(label)
    result = run_with_timeout(
        [sys.executable, "tools/check_dataset.py", root, "--out", tmp_path / "report"]
    )
    assert result.returncode >= 0, f"killed by signal {-result.returncode}"
    if result.returncode == 0:
        train = last_json(result.stdout)["splits"]["train"]
        samples = cityscapes.open_dataset(root, "train").samples
        assert list(train["pixels"].values()) == independent_counts(samples, 3)
    else:
        one_line_error(result, 1)


@pytest.mark.slow
def test_a_reading_process_that_dies_ends_the_check_with_one_line():
    """As the kernel's out-of-memory killer ends a process: SIGKILL, no exception to pass back."""
    code = (
        "import signal, sys; sys.path[:0] = ['tools']; import cli, check_dataset\n"
        "cli.main(check_dataset.read_all, signal.raise_signal, [signal.SIGKILL] * 4, 2, 'x')"
    )
    result = run_with_timeout([sys.executable, "-c", code], timeout=120)
    assert one_line_error(result, 1).startswith("error: a process reading x died")
