"""Deployment: OpenVINO IR (fp32 and NNCF int8) and ONNX exports scored by evaluate.py's official
metric against the checkpoint they came from, their self-description, the benchmark against eager
fp32, live video, and the optional runtimes' one-line errors."""

import os
import stat
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import in_process, last_json, one_line_error, succeeded
from PIL import Image

import benchmark_inference
import deploy
import evaluate
import export
from checkpoints import load_model
from cityscapes import PALETTE
from deploy import read_metadata, to_openvino

pytestmark = pytest.mark.slow  # every test here trains (conftest's learned) or exports

openvino = pytest.importorskip(
    "openvino", reason="OpenVINO is optional here; CI installs it (pip install openvino nncf)"
)


def summary_of(main, argv, capsys):
    main([str(a) for a in argv])
    return last_json(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(learned):
    """The checkpoint of conftest's learned run (R18, 150 iterations from scratch, mIoU > 25)."""
    return learned[1] / "latest.pth"


@pytest.fixture(scope="module")
def synthetic_root(learned):
    """Its data: deployment is checked on the images the model learned, not on data it never saw."""
    return learned[0]


@pytest.fixture(scope="module")
def exported(trained, synthetic_root, tmp_path_factory):
    """fp32 and int8 IR of the trained model, and their export summaries."""
    folder = tmp_path_factory.mktemp("ir")
    common = ["--ckpt", trained, "--format", "openvino", "--size", "128x256"]
    fp32 = last_json(succeeded("tools/export.py", *common, "--out", folder / "fp32.xml"))
    int8 = last_json(
        succeeded(
            "tools/export.py",
            *common,
            "--out",
            folder / "int8.xml",
            "--int8",
            "--calib-data",
            synthetic_root,
            "--calib-images",
            "8",
        )
    )
    return folder, fp32, int8


def scored(capsys, synthetic_root, out_dir, *model):
    script = deploy.main if "--model" in model else evaluate.main
    return summary_of(
        script,
        [
            *model,
            "--data-root",
            synthetic_root,
            "--workers",
            "0",
            "--out-dir",
            out_dir,
            "--format",
            "trainIds",
        ],
        capsys,
    )


def class_maps(folder):
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))])


def test_openvino_ir_equals_pytorch_and_describes_itself(exported, trained):
    folder, fp32, int8 = exported
    assert (
        fp32["max_abs_logit_diff_f32"] < 1e-4 and int8["max_abs_logit_diff_f32"] < 1e-4
    )  # the float graph, f32
    assert (
        fp32["class_agreement"] > 0.99 and int8["precision"] == "int8" and int8["calib_images"] == 8
    )
    ov_model, metadata = read_metadata(folder / "int8.xml")
    assert (
        metadata["size"] == [128, 256]
        and metadata["source"] == str(trained)
        and metadata["precision"] == "int8"
    )
    assert (
        metadata["dataset"]["palette"] == PALETTE.tolist()
        and metadata["model_config"] == load_model(trained)[0].config.to_dict()
    )
    assert (
        ov_model.inputs[0].partial_shape.to_string() == "[?,3,?,?]"
    )  # any batch and size: reshaped when compiled
    fake_quantize = {
        name: sum(
            op.get_type_name() == "FakeQuantize" for op in read_metadata(folder / name)[0].get_ops()
        )
        for name in ("fp32.xml", "int8.xml")
    }
    assert (
        fake_quantize["fp32.xml"] == 0 and fake_quantize["int8.xml"] > 50
    )  # the precision read back from the file
    assert sorted(p.name for p in folder.iterdir()) == [
        "fp32.bin",
        "fp32.xml",
        "int8.bin",
        "int8.xml",
    ]  # no temp files
    assert (
        stat.S_IMODE(os.stat(folder / "int8.xml").st_mode) & 0o044 == 0o044
    )  # readable by others, unlike mkstemp's


def test_exported_models_score_like_their_checkpoint(
    exported, trained, synthetic_root, tmp_path, capsys
):
    """The same official metric on the same val images: fp32 IR = the checkpoint; int8 within 0.5
    mIoU, >= 99% of pixels agreeing with fp32."""
    folder, _, _ = exported
    reference = scored(capsys, synthetic_root, tmp_path / "ckpt", "--ckpt", trained, "--amp", "O0")
    fp32 = scored(
        capsys, synthetic_root, tmp_path / "fp32", "--model", folder / "fp32.xml", "--amp", "O0"
    )
    int8 = scored(capsys, synthetic_root, tmp_path / "int8", "--model", folder / "int8.xml")
    assert reference["mIoU"] > 25, reference  # trained: a real class map to agree with
    assert fp32["precision"] == "OpenVINO f32" and int8["precision"].startswith("OpenVINO int8")
    assert abs(fp32["mIoU"] - reference["mIoU"]) < 0.05
    assert abs(int8["mIoU"] - reference["mIoU"]) < 0.5, (int8["mIoU"], reference["mIoU"])
    assert (class_maps(tmp_path / "int8") == class_maps(tmp_path / "ckpt")).mean() >= 0.99
    assert (class_maps(tmp_path / "fp32") == class_maps(tmp_path / "ckpt")).mean() > 0.9999
    assert (
        int8["per_class"].keys() == reference["per_class"].keys()
        and int8["images"] == reference["images"] == 6
    )


def test_onnx_model_is_evaluated_like_its_checkpoint(trained, synthetic_root, tmp_path, capsys):
    pytest.importorskip(
        "onnxruntime",
        reason="onnxruntime is an optional extra (pip install -r requirements-dev.txt)",
    )
    summary_of(
        export.main,
        ["--ckpt", trained, "--out", tmp_path / "m.onnx", "--size", "128x256", "--dynamic"],
        capsys,
    )
    reference = scored(capsys, synthetic_root, tmp_path / "ckpt", "--ckpt", trained, "--amp", "O0")
    onnx = scored(capsys, synthetic_root, tmp_path / "onnx", "--model", tmp_path / "m.onnx")
    assert onnx["precision"] == "ONNX Runtime fp32" and abs(onnx["mIoU"] - reference["mIoU"]) < 0.05
    assert (class_maps(tmp_path / "onnx") == class_maps(tmp_path / "ckpt")).mean() > 0.9999


def test_deployed_benchmark_and_images(exported, trained, synthetic_root, tmp_path, capsys):
    folder, _, _ = exported
    result = summary_of(
        benchmark_inference.main,
        ["--model", folder / "int8.xml", "--size", "64x128", "--runs", "2", "--warmup", "1"],
        capsys,
    )
    assert (
        result["baseline"] == f"eager fp32 of {trained}"
        and result["speedup"] > 0
        and result["size"] == "64x128"
    )
    assert result["precision"].startswith("OpenVINO int8")
    images = sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))[:2]
    summary_of(
        deploy.main,
        [
            "--model",
            folder / "fp32.xml",
            "--images",
            images[0].parent,
            "--out-dir",
            tmp_path / "color",
        ],
        capsys,
    )
    written = sorted((tmp_path / "color").glob("*_color.png"))
    assert len(written) == len(list(images[0].parent.glob("*.png")))
    colours = np.concatenate([np.array(Image.open(p)).reshape(-1, 3) for p in written])
    assert {tuple(c) for c in colours} <= {tuple(c) for c in PALETTE.tolist()}


def write_video(path, frames, fps):
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0])
    )
    for frame in frames:
        writer.write(frame)
    writer.release()


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (frame := capture.read())[0]:
        frames.append(frame[1])
    return frames, capture.get(cv2.CAP_PROP_FPS)


@pytest.mark.parametrize("source", ["ckpt", "int8"])
def test_video_overlay_keeps_frames_size_and_rate_and_carries_the_palette(
    exported, trained, synthetic_root, tmp_path, capsys, source
):
    images = sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))
    write_video(tmp_path / "in.mp4", [cv2.imread(str(p)) for p in images], fps=12)
    model = ["--ckpt", trained] if source == "ckpt" else ["--model", exported[0] / "int8.xml"]
    summary = summary_of(
        deploy.main, [*model, "--video", tmp_path / "in.mp4", "--out", tmp_path / "out.mp4"], capsys
    )
    assert (
        summary["frames"] == 6
        and summary["size"] == "128x256"
        and summary["input_fps"] == 12
        and summary["effective_fps"] > 0
    )
    frames_in, _ = read_video(tmp_path / "in.mp4")  # what the tool decoded
    frames_out, fps = read_video(tmp_path / "out.mp4")
    assert len(frames_out) == 6 and frames_out[0].shape == (128, 256, 3) and fps == 12
    # Independently: the class map of each decoded frame by the checkpoint in fp32, blended with the
    # palette.
    model = load_model(trained)[0]
    palette_bgr = PALETTE[:, ::-1].astype(np.float32)
    agree = []
    for frame_in, frame_out in zip(frames_in, frames_out):
        with torch.no_grad():
            pred = (
                model(
                    torch.from_numpy(cv2.cvtColor(frame_in, cv2.COLOR_BGR2RGB))
                    .permute(2, 0, 1)[None]
                    .float()
                )
                .argmax(1)[0]
                .numpy()
            )
        colour = 2 * frame_out.astype(np.float32) - frame_in.astype(
            np.float32
        )  # the overlay's palette half, with codec noise
        nearest = np.abs(colour[:, :, None, :] - palette_bgr[None, None]).sum(-1).argmin(-1)
        agree.append((nearest == pred).mean())
    assert np.mean(agree) > 0.95, (
        agree
    )  # 97-98% measured; the rest is the mp4 codec's noise at class edges
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temp file left


def test_missing_runtimes_and_bad_flags_are_one_line_errors(
    exported, trained, synthetic_root, tmp_path, monkeypatch
):
    folder, _, _ = exported
    with monkeypatch.context() as hidden:
        # as if not installed: importing it raises ImportError
        hidden.setitem(sys.modules, "openvino", None)
        hidden.setitem(sys.modules, "nncf", None)
        line = one_line_error(
            in_process(
                "tools/deploy.py", "--model", folder / "int8.xml", "--data-root", synthetic_root
            )
        )
        assert line.startswith("error: ") and line.endswith("pip install openvino nncf")
        openvino_export = ["--format", "openvino", "--out", tmp_path / "m.xml"]
        line = one_line_error(in_process("tools/export.py", "--ckpt", trained, *openvino_export))
        assert line.endswith("pip install openvino nncf") and not (tmp_path / "m.xml").exists()
    (tmp_path / "taken.mp4").write_bytes(b"the user's")
    (tmp_path / "ir").mkdir()
    # an IR without our description
    openvino.save_model(to_openvino(load_model(trained)[0]), tmp_path / "ir" / "anonymous.xml")
    export, run = ["tools/export.py", "--ckpt", trained], ["tools/deploy.py", "--model"]
    int8, anonymous = folder / "int8.xml", tmp_path / "ir" / "anonymous.xml"
    missing_video = ["--video", tmp_path / "missing.mp4", "--out", tmp_path / "o.mp4"]
    calls = {
        "--int8 and --calib-data go together": [*export, "--format", "openvino", "--int8"],
        "add --format openvino": [*export, "--int8", "--calib-data", synthetic_root],
        "does not end in .xml": [*export, "--format", "openvino", "--out", tmp_path / "m.onnx"],
        "need --ckpt: an exported model runs one whole-image pass": [*run, int8, "--flip"],
        "runs on the CPU": [*run, int8, "--device", "cuda"],
        "no such file": [*run, tmp_path / "missing.xml"],
        "is never overwritten": [*run, int8, "--video", "in.mp4", "--out", tmp_path / "taken.mp4"],
        "does not describe its classes": [*run, anonymous, "--data-root", synthetic_root],
        "cannot open it": [*run, int8, *missing_video],
    }
    for expected, argv in calls.items():
        line = one_line_error(in_process(*argv))
        assert expected in line, (expected, line)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["ir", "taken.mp4"]
        and (tmp_path / "taken.mp4").read_bytes() == b"the user's"
    )
