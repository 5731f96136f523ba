"""tools/check_dataset.py against counts made here independently (PIL and numpy over the label files)."""

import json

import numpy as np
import pytest
from conftest import in_process, last_json
from PIL import Image

import interop
import synthetic

CAMVID_VOID = 11


def independent_counts(pairs, num_classes, void=None):
    """Pixels per class of the label files, read with PIL alone (void folded into 255)."""
    counts = np.zeros(256, np.int64)
    for _, label in pairs:
        values = np.array(Image.open(label)).ravel()
        counts += np.bincount(np.where(values == void, 255, values) if void is not None else values, minlength=256)
    return counts[:num_classes].tolist()


@pytest.mark.parametrize("layout", ["cityscapes", "mmseg", "list", "camvid"])
def test_check_counts_every_class_and_draws_the_pictures(layout, synthetic_root, tmp_path):
    if layout == "cityscapes":
        root = synthetic_root
    else:
        root = synthetic.synthesize_folder(tmp_path / "data", classes=5, train=6, val=2, height=64, width=128, layout=layout, seed=4)
    result = in_process("tools/check_dataset.py", root, "--out", tmp_path / "report", "--samples", "2", "--nproc", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    import cityscapes

    for split in ("train", "val"):
        dataset = cityscapes.open_dataset(root, split)
        counts = independent_counts(dataset.samples, dataset.info.num_classes, CAMVID_VOID if layout == "camvid" else None)
        part = summary["splits"][split]
        assert list(part["pixels"].values()) == counts and part["images"] == len(dataset)
        assert part["absent"] == [name for name, count in zip(dataset.info.class_names, counts) if count == 0]
        with Image.open(tmp_path / "report" / f"samples_{split}.png") as picture:
            assert picture.width > 400 and picture.height > 200
    images = [np.array(Image.open(image).convert("RGB"), np.float64).reshape(-1, 3) for image, _ in cityscapes.open_dataset(root, "train").samples]
    pixels = np.concatenate(images)
    assert np.allclose(summary["rgb_mean"], pixels.mean(0), atol=0.01) and np.allclose(summary["rgb_std"], pixels.std(0), atol=0.01)
    with Image.open(tmp_path / "report" / "class_pixels.png") as chart:
        assert chart.width >= 600


def test_check_names_a_broken_file_and_goes_on(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    broken = sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    result = in_process("tools/check_dataset.py", root, "--out", tmp_path / "report", "--samples", "0", "--nproc", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {broken}: unreadable label PNG" in result.stderr
    assert last_json(result.stdout)["splits"]["val"]["broken"] == [f"{broken}: unreadable label PNG; re-create or re-convert it"]


def test_check_explains_masks_of_0_and_255(tmp_path):
    root = synthetic.synthesize_folder(tmp_path / "data", classes=2, train=2, val=1, height=64, width=128, seed=5)
    for label in (root / "ann_dir").rglob("*.png"):
        values = np.array(Image.open(label))
        Image.fromarray(np.where(values == 1, 255, 0).astype(np.uint8)).save(label)
    result = in_process("tools/check_dataset.py", root, "--out", tmp_path / "report", "--samples", "0", "--nproc", "1")
    info = interop.folder_info(root)
    assert f"warning: train: 1 of 2 classes never occur: {info.class_names[1]}" in result.stderr
    assert "labels hold only 0 and 255, and 255 is the ignore value: if 255 marks your foreground, write it as 1" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["splits"]["train"]["absent"] == [info.class_names[1]]
