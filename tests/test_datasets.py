"""Your own data: the generic layouts and CamVid end to end, class tables that travel with
checkpoints, label checks, and the README walkthrough run as written."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, in_process, last_json, one_line_error
from PIL import Image

import datasets
import synthetic
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import CITYSCAPES, open_dataset
from datasets import DataError, read_label
from interop import CAMVID, read_classes

TINY = [
    "--depth",
    "18",
    "--batch-size",
    "2",
    "--crop",
    "64x128",
    "--workers",
    "0",
    "--log-interval",
    "1",
    "--warmup-iters",
    "0",
    "--lr",
    "0.02",
]


def test_classes_file_names_colours_and_default_palette(tmp_path):
    (tmp_path / "classes.txt").write_text(
        "# my classes\nbackground 0 0 0\ntraffic light 250 170 30\n\nroad\n"
    )
    info = read_classes(tmp_path / "classes.txt", "mine")
    assert info.class_names == ("background", "traffic light", "road") and info.num_classes == 3
    assert info.palette[:2] == ((0, 0, 0), (250, 170, 30)) and info.palette[2] == tuple(
        datasets.voc_palette(3)[2]
    )
    assert datasets.voc_palette(3) == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]  # VOC's first colours
    assert datasets.DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    (tmp_path / "classes.txt").write_text("only one\n")
    with pytest.raises(DataError, match="1 classes; expected 2 to 255"):
        read_classes(tmp_path / "classes.txt", "mine")


def test_palette_png_labels_are_read_as_indices_and_camvid_void_is_ignored(tmp_path):
    indices = np.array([[0, 1, 2], [6, 255, 3]], dtype=np.uint8)
    png = Image.fromarray(indices).convert("P")
    png.putpalette([c for color in datasets.voc_palette(256) for c in color])
    png.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    info = datasets.DatasetInfo(
        "seven", tuple(f"c{k}" for k in range(7)), tuple(datasets.voc_palette(7))
    )
    assert np.array_equal(read_label(tmp_path / "p.png", info), indices)
    camvid = np.array([[0, 10, 11]], dtype=np.uint8)
    Image.fromarray(camvid).save(tmp_path / "c.png")
    assert np.array_equal(read_label(tmp_path / "c.png", CAMVID), [[0, 10, 255]])
    Image.fromarray(np.array([[0, 7, 9]], dtype=np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError) as error:
        read_label(tmp_path / "bad.png", info)
    assert str(error.value).startswith(
        f"{tmp_path / 'bad.png'}: label values [7, 9] are not classes of seven (0..6 or 255 = "
        "ignore)"
    )
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="single-channel 8-bit PNG of class indices"):
        read_label(tmp_path / "rgb.png", info)


@pytest.mark.slow
@pytest.mark.parametrize("layout, classes", [("mmseg", 7), ("list", 40), ("camvid", 11)])
def test_generic_layouts_train_evaluate_and_predict_with_their_own_classes(
    tmp_path, layout, classes
):
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=classes, train=6, val=2, layout=layout, seed=3
    )
    dataset = open_dataset(root, "val")
    assert dataset.info.num_classes == classes and len(dataset) == 2
    trained = in_process(
        "train.py",
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd",
        *TINY,
        *"--iters 3 --val-interval 3 --ckpt-interval 3".split(),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (
        f"dataset: {dataset.info.name} (folder), {classes} classes, 6 training images"
        in trained.stdout
    )
    checkpoint = torch.load(tmp_path / "wd" / "iter_3.pth", weights_only=True)
    assert (
        checkpoint["dataset"] == dataset.info.to_dict()
        and checkpoint["model_config"]["num_classes"] == classes
    )

    evaluated = in_process(
        "evaluate.py", "--ckpt", tmp_path / "wd" / "latest.pth", "--data-root", root
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = last_json(evaluated.stdout)
    assert (
        list(summary["per_class"]) == list(dataset.info.class_names)
        and summary["dataset"] == dataset.info.name
    )
    assert (
        f"{dataset.info.class_names[-1]:>15} | " in evaluated.stdout
    )  # the table names this dataset's classes

    # predictions of a folder of images, coloured with this dataset's palette, with no other flag
    # than the checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    for image, _ in dataset.samples:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "pred"
    for fmt in ("color", "trainIds"):
        latest = tmp_path / "wd" / "latest.pth"
        predicted = in_process(
            "evaluate.py", "--ckpt", latest, "--images", folder, "--out-dir", out, "--format", fmt
        )
        assert predicted.returncode == 0, predicted.stderr[-3000:]
    for color_png in sorted(out.glob("*_color.png")):
        color = np.array(Image.open(color_png))
        indices = np.array(Image.open(str(color_png).replace("_color", "_trainIds")))
        assert np.array_equal(color, dataset.info.colors[indices])


def seven_class_data(tmp_path):
    """A 7-class dataset in the list layout, and a 19-class Cityscapes model saved as checkpoints
    were before datasets were saved with them."""
    root = synthetic.synthesize_folder(
        tmp_path / "data", classes=7, train=4, val=2, layout="list", seed=4
    )
    cityscapes_model = BiSeNetV1(ModelConfig(18))
    torch.save(
        {"model_config": cityscapes_model.config.to_dict(), "model": cityscapes_model.state_dict()},
        tmp_path / "city.pth",
    )
    return root, cityscapes_model


def test_a_label_value_outside_the_classes_is_a_one_line_error(tmp_path):
    root, _ = seven_class_data(tmp_path)
    bad = root / "labels" / "train_0001.png"
    Image.fromarray(np.full((128, 256), 9, np.uint8)).save(bad)
    last = one_line_error(
        in_process(
            "train.py",
            "--data-root",
            root,
            "--work-dir",
            tmp_path / "wd",
            *TINY,
            "--iters",
            "4",
            "--no-validate",
        )
    )
    assert (
        str(bad) in last
        and "label values [9] are not classes of data (0..6 or 255 = ignore)" in last
    )


def test_a_model_of_other_classes_is_not_evaluated_on_the_data(tmp_path):
    root, _ = seven_class_data(tmp_path)
    last = one_line_error(
        in_process("evaluate.py", "--ckpt", tmp_path / "city.pth", "--data-root", root)
    )
    assert "a model of 19 classes, but" in last and "has 7" in last


@pytest.mark.slow
def test_load_from_a_model_of_other_classes_keeps_the_backbone_and_starts_the_classifiers_anew(
    tmp_path,
):
    root, cityscapes_model = seven_class_data(tmp_path)
    args = [
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "ft",
        *TINY,
        "--iters",
        "1",
        "--no-validate",
        "--load-from",
        tmp_path / "city.pth",
        "--lr",
        "1e-9",
    ]
    tuned = in_process("train.py", *args, "--min-lr", "0", "--dropout", "0")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert (
        f"{tmp_path / 'city.pth'}: 19 classes, the data has 7: the 3 classifier layers are "
        "re-initialised" in tuned.stdout
    )
    weights = torch.load(tmp_path / "ft" / "iter_1.pth", weights_only=True)["model"]
    assert weights["head.classifier.weight"].shape[0] == 7
    torch.testing.assert_close(
        weights["backbone.conv1.weight"],
        cityscapes_model.state_dict()["backbone.conv1.weight"],
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.slow
def test_an_old_checkpoint_is_a_cityscapes_one(tmp_path, synthetic_root):
    model = BiSeNetV1(ModelConfig(18))
    torch.save(
        {"model_config": model.config.to_dict(), "model": model.state_dict()}, tmp_path / "old.pth"
    )
    result = in_process(
        "evaluate.py", "--ckpt", tmp_path / "old.pth", "--data-root", synthetic_root, "--amp", "O0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["dataset"] == "cityscapes" and list(summary["per_class"]) == list(
        CITYSCAPES.class_names
    )


def readme_walkthrough():
    text = (ROOT / "docs" / "your-data.md").read_text()
    block = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "docs/your-data.md lost its walkthrough block"
    return [line for line in block[1].splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "tools").mkdir()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]:
        shutil.copy(path, project / path.relative_to(ROOT))
    for command in readme_walkthrough():
        result = subprocess.run(
            ["bash", "-c", f"set -e; {command}"],
            cwd=project,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert len(list((project / "work_dirs" / "mydata" / "predictions").rglob("*_overlay.png"))) == 4
    assert last_json(result.stdout)["out_dir"] == "work_dirs/mydata/predictions"
