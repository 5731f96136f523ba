"""What the scripts write never replaces a user's file nor leaves a partial one: predictions,
synthesized and converted datasets, videos and exports. Each test first sets up what a user would
have, then checks the sha256 of every user file before and after, that no temporary file is left,
and the exit code and one line where a write is refused."""

import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_of, digest, hidden_files, in_process_error, in_process_summary
from PIL import Image
from test_safety import in_small_filesystem

import cityscapes
import convert_labels
import datasets
import deploy
import evaluate
import export
import synthetic
from video import segment_video


# -- 1. prediction files ---------------------------------------------------------------------------
@pytest.mark.slow
def test_predictions_keep_their_folders_and_extensions_and_never_collide(my7, tmp_path, capsys):
    root, ckpt = my7
    photos = tmp_path / "photos"
    image = sorted((root / "img_dir" / "val").rglob("*.jpg"))[0]
    for rel in ("cam1/0001.jpg", "cam2/0001.jpg", "cam1/0001.png"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).save(photos / rel)
    Image.open(image).rotate(90).save(
        photos / "cam1" / "0001_color.png"
    )  # the user's own file, named as a prediction would be
    before = digest(photos)
    out = tmp_path / "out"
    in_process_summary(
        evaluate.main,
        ["--ckpt", ckpt, "--images", photos, "--out-dir", out, "--workers", "0"],
        capsys,
    )
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == [
        "cam1/0001.jpg_color.png",
        "cam1/0001.png_color.png",
        "cam1/0001_color_color.png",
        "cam2/0001_color.png",
    ]
    assert digest(photos) == before and not hidden_files(out)

    previous = digest(out)
    for target in (
        photos,
        photos / "cam1",
        out,
    ):  # among the inputs, or over an earlier run's files
        error = in_process_error(
            evaluate.main,
            ["--ckpt", ckpt, "--images", photos, "--out-dir", target, "--workers", "0"],
            capsys,
            allow_warnings=True,
        )
        assert "inside the input folder" in error or "exists" in error, error
    assert digest(photos) == before and digest(out) == previous


def test_nested_dataset_images_of_one_name_get_one_prediction_each(my7, tmp_path, capsys):
    root, ckpt = my7
    data = copy_of(root, tmp_path)
    first, second = sorted((data / "img_dir" / "val").rglob("*.jpg"))[:2]
    assert first.parent != second.parent
    for path, folder in (
        (first, "ann_dir"),
        (second, "ann_dir"),
    ):  # the same file name in both scene folders
        label = data / folder / "val" / path.parent.name / f"{path.stem}.png"
        label.rename(label.with_name("same.png"))
        path.rename(path.with_name("same.jpg"))
    out = tmp_path / "preds"
    result = in_process_summary(
        evaluate.main,
        [
            "--ckpt",
            ckpt,
            "--data-root",
            data,
            "--out-dir",
            out,
            "--format",
            "trainIds",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert result["images"] == 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        f"img_dir/val/{first.parent.name}/same_trainIds.png",
        f"img_dir/val/{second.parent.name}/same_trainIds.png",
    ]


# -- 2. datasets written over ----------------------------------------------------------------------
def test_synthesize_never_writes_into_an_existing_dataset(my7, tmp_path, capsys):
    data = copy_of(my7[0], tmp_path, "mydata")
    before = digest(data)
    error = in_process_error(
        synthetic.main, ["folder", data, "--classes", "5"], capsys, allow_warnings=True
    )
    assert error == (
        f"error: {data} already exists and is not empty; synthesize writes a new dataset: "
        "pass a new folder (nothing was written)"
    )
    with pytest.raises(datasets.DataError, match="already exists and is not empty"):
        synthetic.synthesize_cityscapes(data, train=1, val=0, height=64, width=128)
    assert digest(data) == before


def test_convert_labels_keeps_coincheung_lists_and_cityscapes_reads_them(tmp_path):
    root = synthetic.synthesize_cityscapes(
        tmp_path / "cs", train=2, val=2, height=64, width=128, seed=1
    )
    lists = {}
    for split in ("train", "val"):
        images = sorted((root / "leftImg8bit" / split).rglob(f"*{cityscapes.IMAGE_SUFFIX}"))
        suffixes = (cityscapes.IMAGE_SUFFIX, cityscapes.LABEL_SUFFIX)
        labels = [
            root / "gtFine" / split / p.parent.name / p.name.replace(*suffixes) for p in images
        ]
        lines = [f"{p.relative_to(root)},{q.relative_to(root)}" for p, q in zip(images, labels)]
        # CoinCheung's `image,label` lines, their own order
        (root / f"{split}.txt").write_text("\n".join(reversed(lines)) + "\n")
        lists[split] = lines
    before = digest(root / "train.txt", root / "val.txt")
    assert not convert_labels.convert_dataset(root, source="labelIds", progress=False)
    assert digest(root / "train.txt", root / "val.txt") == before
    dataset = cityscapes.open_dataset(root, "val")
    assert [
        f"{image.relative_to(root)},{label.relative_to(root)}" for image, label in dataset.samples
    ] == list(reversed(lists["val"]))
    assert dataset[0]["label"].shape == (64, 128) and not hidden_files(root)


# -- 3. video --------------------------------------------------------------------------------------
def write_video(path, frames, size=(64, 128), codec="MJPG"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 10.0, (size[1], size[0]))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    writer.release()
    return path


def test_video_keeps_a_file_that_appeared_at_out_during_the_run(tmp_path, capsys):
    source, out = write_video(tmp_path / "drive.avi", 4), tmp_path / "drive_seg.avi"
    info = datasets.unnamed_classes(7)

    def segment(images):  # another program writes `out` while the video is being segmented
        if not out.exists():
            out.write_bytes(b"someone else's video")
        return torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.long)

    result = segment_video(segment, source, out=out, info=info, progress=False)
    assert out.read_bytes() == b"someone else's video"
    assert (
        result["out"] == str(tmp_path / "drive_seg_2.avi")
        and result["frames"] == 4
        and not result["truncated"]
    )
    assert "it was kept, and the video is" in capsys.readouterr().err
    assert not hidden_files(tmp_path)


def test_a_truncated_or_odd_sized_video_says_so(tmp_path):
    source = write_video(tmp_path / "cut.avi", 10)
    data = source.read_bytes()
    source.write_bytes(data[: int(len(data) * 0.6)])
    result = segment_video(
        lambda x: torch.zeros(1, *x.shape[2:], dtype=torch.long),
        source,
        out=tmp_path / "cut_seg.avi",
        info=datasets.unnamed_classes(3),
        progress=False,
    )
    assert result["frames"] < 10 and result["frames_expected"] == 10 and result["truncated"]

    for i in range(
        3
    ):  # OpenCV's video writers round odd sizes down; an image sequence is a 67x129 source
        cv2.imwrite(str(tmp_path / f"frame_{i:03d}.png"), np.zeros((67, 129, 3), np.uint8))
    odd = tmp_path / "frame_%03d.png"
    result = segment_video(
        lambda x: torch.zeros(1, *x.shape[2:], dtype=torch.long),
        odd,
        out=tmp_path / "odd_seg.mp4",
        info=datasets.unnamed_classes(3),
        progress=False,
    )
    written = cv2.VideoCapture(result["out"])
    height = int(written.get(cv2.CAP_PROP_FRAME_HEIGHT))
    width = int(written.get(cv2.CAP_PROP_FRAME_WIDTH))
    assert result["out_size"] == f"{height}x{width}"
    assert (
        result["size"] == "67x129" and result["out_size"] == "66x128"
    )  # mp4v rounds odd sizes down, and the JSON says so


def test_video_refuses_images_and_out_dir_it_would_ignore(my7, tmp_path, capsys):
    video = write_video(tmp_path / "v.avi", 2)
    for extra in (["--images", tmp_path], ["--out-dir", tmp_path / "o"]):
        error = in_process_error(
            deploy.main, ["--ckpt", my7[1], "--video", video, *extra], capsys, allow_warnings=True
        )
        assert "not used with --video" in error


# -- 4. exports ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_never_replaces_a_model_and_leaves_nothing_hidden(my7, tmp_path, capsys):
    ckpt = my7[1]
    folder = tmp_path / "models"
    folder.mkdir()
    result = in_process_summary(
        export.main, ["--ckpt", ckpt, "--out", folder / "m7.onnx", "--size", "64x128"], capsys
    )
    assert result["onnx"] == str(folder / "m7.onnx")
    assert sorted(p.name for p in folder.iterdir()) == [
        "m7.onnx"
    ]  # no .data beside it, no temp file
    before = digest(folder)
    assert "m7.onnx exists" in in_process_error(
        export.main,
        ["--ckpt", ckpt, "--out", folder / "m7.onnx", "--size", "64x128"],
        capsys,
        allow_warnings=True,
    )
    (folder / "ov.bin").write_bytes(b"a user's weights")
    before = digest(folder)
    assert "ov.bin exists" in in_process_error(
        export.main,
        ["--ckpt", ckpt, "--format", "openvino", "--out", folder / "ov.xml", "--size", "64x128"],
        capsys,
        allow_warnings=True,
    )
    for size in ("1x1", "100000x100000"):
        assert "each side must be 32 to 8192" in in_process_error(
            export.main,
            ["--ckpt", ckpt, "--out", folder / "x.onnx", "--dynamic", "--size", size],
            capsys,
            allow_warnings=True,
        )
    assert digest(folder) == before


@pytest.mark.slow
def test_openvino_export_writes_the_pair_and_refuses_int8_without_images(my7, tmp_path, capsys):
    root, ckpt = my7
    out = tmp_path / "m7.xml"
    in_process_summary(
        export.main,
        ["--ckpt", ckpt, "--format", "openvino", "--out", out, "--size", "64x128"],
        capsys,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m7.bin", "m7.xml"]
    before = digest(tmp_path)
    assert "m7.xml exists" in in_process_error(
        export.main,
        ["--ckpt", ckpt, "--format", "openvino", "--out", out, "--size", "64x128"],
        capsys,
        allow_warnings=True,
    )
    empty = copy_of(root, tmp_path / "calib")
    shutil.rmtree(empty / "img_dir" / "train")
    (empty / "img_dir" / "train").mkdir()
    args = [
        "--ckpt",
        ckpt,
        "--format",
        "openvino",
        "--out",
        tmp_path / "int8.xml",
        "--int8",
        "--calib-data",
        empty,
    ]
    assert "has no images to calibrate int8 on" in in_process_error(
        export.main, args, capsys, allow_warnings=True
    )
    assert not (tmp_path / "int8.xml").exists() and not (tmp_path / "int8.bin").exists()
    assert {
        k: v for k, v in digest(tmp_path).items() if "/calib/" not in k
    } == before and not hidden_files(tmp_path)
    lone = tmp_path / "lone.xml"
    shutil.copy(out, lone)  # an .xml whose .bin was not copied with it
    error = in_process_error(
        deploy.main,
        [
            "--model",
            lone,
            "--images",
            tmp_path / "calib" / "data" / "img_dir" / "val",
            "--out-dir",
            tmp_path / "p",
        ],
        capsys,
        allow_warnings=True,
    )
    assert (
        "not a readable .xml model" in error
        and "Exception from" not in error
        and "bin" in error.split("(", 1)[1]
    ), error


# -- 5. a full disk --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_under_predictions_or_an_export_is_one_line_and_leaves_nothing(my7, tmp_path):
    root, ckpt = my7
    mount = tmp_path / "small"
    export_cmd = [
        sys.executable,
        "tools/export.py",
        "--ckpt",
        str(ckpt),
        "--format",
        "openvino",
        "--out",
        str(mount / "m7.xml"),
        "--size",
        "64x128",
    ]
    result = in_small_filesystem(
        mount, 8, ["bash", "-c", " ".join(export_cmd) + f'; code=$?; ls -A "{mount}"; exit $code']
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        f"error: {mount / 'm7.xml'}: OpenVINO could not write the model (" in result.stderr
        and " MB are free in " in result.stderr
    )
    assert result.stdout.split()[-1:] != ["m7.xml"] and not [
        name for name in result.stdout.split() if name.startswith((".m7", "m7"))
    ]

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(80):  # random pixels: about 25 kB per overlay PNG, 2 MB in all
        Image.fromarray(
            np.random.default_rng(k).integers(0, 255, (64, 128, 3), dtype=np.uint8)
        ).save(photos / f"{k:02d}.png")
    evaluate_cmd = [
        sys.executable,
        "evaluate.py",
        "--ckpt",
        str(ckpt),
        "--images",
        str(photos),
        "--out-dir",
        str(mount / "preds"),
        "--format",
        "overlay",
    ]
    result = in_small_filesystem(
        mount,
        1,
        ["bash", "-c", " ".join(evaluate_cmd) + f'; code=$?; ls -A "{mount}/preds"; exit $code'],
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        "cannot write the prediction (No space left on device)"
        in result.stderr.strip().splitlines()[-1]
    )
    assert not [
        name for name in result.stdout.split() if name.startswith(".")
    ]  # no temp file of the failed write
