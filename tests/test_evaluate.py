import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, last_json, succeeded
from PIL import Image
from reference_models import randomize_batchnorm

from benchmark import free_port
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import PALETTE, TRAINID_TO_LABELID
from device import Runtime
from evaluate import Inference, confusion_matrix, metrics, predict
from synthetic import trainable_cityscapes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_batchnorm(BiSeNetV1(ModelConfig(18)), torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict()}, path)
    return path


@torch.no_grad()
def test_flip_averaging_happens_in_the_image_frame(model):
    images = torch.rand(1, 3, 96, 160) * 255
    flipped = predict(model, images.flip(3), options=Inference(flip=True))
    torch.testing.assert_close(
        flipped, predict(model, images, options=Inference(flip=True)).flip(3), atol=1e-6, rtol=1e-5
    )
    manual = (model(images).softmax(1) + model(images.flip(3)).softmax(1).flip(3)) / 2
    torch.testing.assert_close(predict(model, images, options=Inference(flip=True)), manual)


@torch.no_grad()
def test_sliding_window_covering_the_image_equals_whole_inference(model):
    images = torch.rand(1, 3, 96, 160) * 255
    whole = predict(model, images)
    assert torch.equal(
        predict(model, images, options=Inference(mode="slide", crop=(96, 160), stride=(64, 64))),
        whole,
    )
    assert torch.equal(
        predict(model, images, options=Inference(mode="slide", crop=(128, 256), stride=(96, 96))),
        whole,
    )


@pytest.mark.slow
@torch.no_grad()
def test_sliding_windows_average_every_overlap(model):
    images = torch.rand(1, 3, 96, 160) * 255
    windows = [(0, 0), (0, 64), (32, 0), (32, 64)]  # crop 64x96, stride 32x64 -> 2 x 2 windows
    total, count = torch.zeros(1, 19, 96, 160), torch.zeros(1, 1, 96, 160)
    for y, x in windows:
        total[:, :, y : y + 64, x : x + 96] += model(images[:, :, y : y + 64, x : x + 96])
        count[:, :, y : y + 64, x : x + 96] += 1
    torch.testing.assert_close(
        predict(model, images, options=Inference(mode="slide", crop=(64, 96), stride=(32, 64))),
        total / count,
    )


@pytest.mark.slow
@torch.no_grad()
def test_multi_scale_with_scale_one_is_single_scale(model):
    images = torch.rand(1, 3, 96, 160) * 255
    single = predict(model, images)
    assert torch.equal(predict(model, images, options=Inference(scales=(1.0,))), single)
    torch.testing.assert_close(
        predict(model, images, options=Inference(scales=(1.0, 1.0))), single.softmax(1)
    )
    multi = predict(model, images, options=Inference(scales=(0.5, 1.0, 1.5), flip=True))
    assert multi.shape == single.shape and torch.allclose(multi.sum(1), torch.ones(1, 96, 160))


def test_mode_names_say_exactly_what_was_run():
    assert Inference((1.0,), False, "whole").name == "ss whole"
    assert Inference((1.0,), True, "whole").name == "flip whole"
    assert Inference((0.5, 1.0), False, "whole").name == "ms whole"
    assert (
        Inference((0.5, 0.75, 1.0), True, "slide", (1024, 1024), (768, 768)).name
        == "ms+flip slide 1024/768"
    )
    assert (
        Inference((1.0,), False, "slide", (512, 1024), (256, 512)).name
        == "ss slide 512x1024/256x512"
    )


def test_confusion_matrix_counts_like_a_masked_histogram_with_fixed_shapes():
    """The metric counts every pixel into C*C+1 bins (the last one: ignored), so its shapes never
    depend on the data (Ascend recompiles on every new shape); numpy's 2-D histogram over the
    labelled pixels is the reference."""
    generator = torch.Generator().manual_seed(3)
    label = torch.randint(0, 7, (1, 33, 65), generator=generator)
    label[torch.rand(label.shape, generator=generator) < 0.3] = 255
    pred = torch.randint(0, 7, (1, 33, 65), generator=generator)
    valid = (label != 255).numpy()
    expected, _, _ = np.histogram2d(
        label.numpy()[valid], pred.numpy()[valid], bins=7, range=[[0, 7], [0, 7]]
    )
    assert torch.equal(confusion_matrix(pred, label, 7), torch.from_numpy(expected).long())
    unlabelled = torch.full((1, 8, 8), 255)
    assert torch.equal(
        confusion_matrix(torch.zeros(1, 8, 8, dtype=torch.long), unlabelled, 7),
        torch.zeros(7, 7, dtype=torch.long),
    )


def test_metrics_follow_the_official_definition():
    label = torch.tensor([0, 0, 1, 1, 2, 255, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    result = metrics(confusion_matrix(pred, label, 4))
    iou = result["iou"]
    assert (
        iou[0] == pytest.approx(1 / 3)
        and iou[1] == pytest.approx(2 / 3)
        and iou[2] == 0.0
        and math.isnan(iou[3])
    )
    assert result["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert result["aAcc"] == pytest.approx(100 * 3 / 5)
    assert result["classes_in_mean"] == 3  # class 3: no pixel in the labels nor the predictions


def test_dice_precision_and_recall_equal_sklearns():
    """sklearn's per-class scores over the labelled pixels (labels=range(C)): f1 is Dice, recall is
    Acc. Where sklearn's zero_division applies (never predicted; never labelled) ours are NaN and
    left out of their means."""
    from sklearn.metrics import jaccard_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(5)
    label = torch.randint(0, 6, (2, 40, 50), generator=generator)
    label[label == 4] = 255  # class 4 never labelled
    label[torch.rand(label.shape, generator=generator) < 0.2] = 255
    pred = torch.where(
        torch.rand(label.shape, generator=generator) < 0.6,
        label.clamp(max=5),
        torch.randint(0, 6, label.shape, generator=generator),
    )
    pred[pred == 3] = 2  # class 3 never predicted
    result = metrics(confusion_matrix(pred, label, 6))
    valid = (label != 255).numpy().ravel()
    y_true, y_pred = label.numpy().ravel()[valid], pred.numpy().ravel()[valid]
    scores = precision_recall_fscore_support(y_true, y_pred, labels=range(6), zero_division=np.nan)
    precision, recall, f1 = scores[:3]
    np.testing.assert_allclose(result["precision"], precision, rtol=1e-12)
    np.testing.assert_allclose(result["recall"], recall, rtol=1e-12)
    np.testing.assert_allclose(result["dice"], f1, rtol=1e-12)
    np.testing.assert_allclose(
        result["iou"], jaccard_score(y_true, y_pred, labels=range(6), average=None), rtol=1e-12
    )  # every class has a pixel
    assert (
        math.isnan(result["precision"][3])
        and math.isnan(result["recall"][4])
        and not math.isnan(result["dice"][4])
    )  # 4 was predicted
    assert result["mDice"] == pytest.approx(100 * np.nanmean(f1)) and result[
        "mAcc"
    ] == pytest.approx(100 * np.nanmean(recall))


@pytest.mark.slow
def test_evaluate_matches_cityscapesscripts_on_exported_label_ids(
    synthetic_root, checkpoint, tmp_path
):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    ours = last_json(
        succeeded(
            "evaluate.py",
            "--ckpt",
            checkpoint,
            "--data-root",
            synthetic_root,
            "--amp",
            "O0",
            "--out-dir",
            tmp_path,
            "--format",
            "labelIds",
            "--workers",
            "0",
        )
    )
    assert ours["mode"] == "ss whole"
    gts = sorted(str(p) for p in synthetic_root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    # predictions keep their image's folder below the data root (leftImg8bit/val/CITY), as the test
    # server accepts
    preds = [
        str(
            tmp_path
            / "leftImg8bit"
            / "val"
            / Path(g).parent.name
            / Path(g).name.replace("_gtFine_labelIds.png", "_labelIds.png")
        )
        for g in gts
    ]
    args = official.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    result = official.evaluateImgLists(preds, gts, args)
    assert ours["mIoU"] == pytest.approx(100 * result["averageScoreClasses"], abs=0.006)
    scored = {k: v for k, v in result["classScores"].items() if not math.isnan(v)}
    assert len(scored) >= 3
    for name, score in scored.items():
        assert ours["per_class"][name] == pytest.approx(100 * score, abs=0.006), name
    assert all(v is None for k, v in ours["per_class"].items() if k not in scored)
    assert ours["classes_in_mean"] == len(
        scored
    )  # the classes cityscapesscripts averages over, said in the JSON
    assert ours["precision"] == "fp32" and all(
        ours[f"per_class_{key}"].keys() == ours["per_class"].keys()
        for key in ("dice", "precision", "recall")
    )


@pytest.mark.slow
def test_distributed_evaluation_counts_each_image_once(tmp_path, checkpoint):
    root = tmp_path / "data"
    trainable_cityscapes(
        root, train=0, val=3, height=64, width=128, seed=3
    )  # 3 images on 2 ranks: uneven shards
    single = last_json(
        succeeded(
            "evaluate.py",
            "--ckpt",
            checkpoint,
            "--data-root",
            root,
            "--amp",
            "O0",
            "--workers",
            "0",
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_BACKEND": "gloo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "evaluate.py",
    ]
    cmd += ["--ckpt", str(checkpoint), "--data-root", str(root), "--amp", "O0", "--workers", "0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = last_json(result.stdout)
    assert distributed["mIoU"] == pytest.approx(single["mIoU"], abs=0.02)
    assert distributed["aAcc"] == pytest.approx(single["aAcc"], abs=0.02)


@pytest.mark.slow
def test_images_folder_gets_palette_colours_and_test_split_label_ids(
    synthetic_root, checkpoint, tmp_path
):
    images = synthetic_root / "leftImg8bit" / "test"
    predict = ["evaluate.py", "--ckpt", checkpoint, "--workers", "0", "--images", images]
    out = last_json(succeeded(*predict, "--out-dir", tmp_path / "trainIds", "--format", "trainIds"))
    assert "mIoU" not in out and out["images"] == 2
    succeeded(*predict, "--out-dir", tmp_path / "color", "--format", "color")
    test_split = ["--data-root", synthetic_root, "--split", "test", "--format", "labelIds"]
    succeeded(*predict[:5], *test_split, "--out-dir", tmp_path / "labelIds")
    written = sorted((tmp_path / "trainIds").rglob("*.png"))
    assert len(written) == 2
    for path in written:
        train_ids = np.array(Image.open(path))
        city, stem = path.parent.name, path.name.replace("_trainIds.png", "")
        color = np.array(Image.open(tmp_path / "color" / city / f"{stem}_color.png"))
        assert np.array_equal(color, PALETTE[train_ids])
        label_ids = np.array(
            Image.open(
                tmp_path / "labelIds" / "leftImg8bit" / "test" / city / f"{stem}_labelIds.png"
            )
        )
        assert np.array_equal(label_ids, TRAINID_TO_LABELID[train_ids])
        assert (
            label_ids.ndim == 2 and stem.count("_") == 2
        )  # {city}_{seq}_{frame}*.png, as the test server expects


@pytest.mark.slow
def test_benchmark_prints_the_protocol_and_json(checkpoint):
    out = succeeded(
        "tools/benchmark_inference.py",
        "--ckpt",
        checkpoint,
        "--size",
        "64x128",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    )
    result = last_json(out)
    assert {
        "latency_ms_median",
        "fps",
        "device",
        "precision",
        "size",
        "baseline_ms_median",
        "speedup",
    } <= set(result)
    assert (
        result["size"] == "64x128"
        and result["precision"] == Runtime(torch.device("cpu")).precision("O1")
        and result["fps"] > 0
    )
    assert "warm-up" in out


@pytest.mark.slow
def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    pytest.importorskip(
        "onnxruntime",
        reason="onnxruntime is an optional extra (pip install -r requirements-dev.txt)",
    )
    result = last_json(
        succeeded(
            "tools/export.py",
            "--ckpt",
            checkpoint,
            "--out",
            tmp_path / "m.onnx",
            "--size",
            "100x164",
            "--dynamic",
        )
    )
    assert result["max_abs_logit_diff"] < 1e-3 and result["argmax_agreement"] > 0.999
    result = last_json(
        succeeded(
            "tools/export.py",
            "--ckpt",
            checkpoint,
            "--out",
            tmp_path / "a.onnx",
            "--size",
            "64x128",
            "--argmax",
        )
    )
    assert result["argmax_agreement"] > 0.999


@pytest.mark.parametrize(
    "small, size, rows",
    [((128, 256), (1024, 2048), 64), ((17, 30), (131, 237), 16), ((8, 8), (5, 7), 4)],
)
def test_banded_class_map_equals_argmax_of_interpolated_logits(small, size, rows):
    from bisenet import upsampled_classes

    torch.manual_seed(1)
    logits = torch.randn(2, 19, *small)
    expected = torch.nn.functional.interpolate(
        logits, size=size, mode="bilinear", align_corners=False
    ).argmax(1)
    assert (upsampled_classes(logits, size, rows=rows) == expected).float().mean() > 0.9999


@torch.no_grad()
def test_single_pass_class_map_is_the_model_argmax(model):
    from evaluate import predict_classes

    images = torch.rand(1, 3, 100, 164) * 255
    assert model(images, upsample=False).shape == (1, 19, 13, 21)
    assert (predict_classes(model, images) == model(images).argmax(1)).float().mean() > 0.9999


@pytest.mark.slow
def test_compare_pictures_line_up_image_truth_and_prediction(synthetic_root, checkpoint, tmp_path):
    """--format compare: the input image | its label in the palette (ignored pixels black) | the
    prediction exactly as --format color writes it, over a legend; the test split and --images have
    no truth to show, and are refused."""
    from cityscapes import open_dataset
    from datasets import read_image, read_label

    common = ["--ckpt", checkpoint, "--data-root", synthetic_root, "--amp", "O0", "--workers", "0"]
    succeeded("evaluate.py", *common, "--out-dir", tmp_path / "compare", "--format", "compare")
    succeeded("evaluate.py", *common, "--out-dir", tmp_path / "color", "--format", "color")
    dataset = open_dataset(synthetic_root, "val")
    colors = np.vstack([np.array(PALETTE, np.uint8), np.zeros((256 - len(PALETTE), 3), np.uint8)])
    for image_path, label_path in dataset.samples:
        image, label = read_image(image_path), read_label(label_path, dataset.info)
        height, width = label.shape
        (compared,) = (tmp_path / "compare").rglob(
            image_path.name.replace("_leftImg8bit.png", "_compare.png")
        )
        (colored,) = (tmp_path / "color").rglob(
            image_path.name.replace("_leftImg8bit.png", "_color.png")
        )
        picture = np.array(Image.open(compared).convert("RGB"))
        assert picture.shape[1] == 3 * width and picture.shape[0] > height  # the legend below
        assert np.array_equal(picture[:height, :width], image)
        assert np.array_equal(picture[:height, width : 2 * width], colors[label])
        assert np.array_equal(
            picture[:height, 2 * width :], np.array(Image.open(colored).convert("RGB"))
        )
    refused = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            *map(str, common),
            "--images",
            str(synthetic_root / "leftImg8bit" / "val"),
            "--out-dir",
            str(tmp_path / "x"),
            "--format",
            "compare",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: --format compare shows the ground truth"
    )
