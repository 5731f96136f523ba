import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from conftest import ROOT
from PIL import Image

import datasets
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import LABEL_SUFFIX, NUM_CLASSES, PALETTE, find_samples, open_dataset
from convert_labels import convert_dataset
from datasets import IGNORE_INDEX, DataError, TrainTransform, levels
from synthetic import synthesize_cityscapes


def all_files(root):
    return sorted(p.relative_to(root) for p in Path(root).rglob("*") if p.is_file())


@pytest.mark.slow
def test_synthesis_is_byte_identical_for_the_same_seed_in_any_number_of_processes(tmp_path):
    synthesize_cityscapes(tmp_path / "a", train=3, val=1, height=64, width=128, seed=9)
    synthesize_cityscapes(tmp_path / "b", train=3, val=1, height=64, width=128, seed=9, nproc=2)
    files = all_files(tmp_path / "a")
    assert files == all_files(tmp_path / "b") and len(files) == 12
    assert all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False) for f in files)
    synthesize_cityscapes(tmp_path / "c", train=3, val=1, height=64, width=128, seed=10)
    assert not filecmp.cmp(tmp_path / "a" / files[-1], tmp_path / "c" / files[-1], shallow=False)


def test_synthetic_layout_and_json_are_cityscapes(synthetic_root):
    jsons = sorted(synthetic_root.glob("gtFine/train/*/*_gtFine_polygons.json"))
    images = sorted(synthetic_root.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    assert len(jsons) == len(images) == 9 and len({p.parent.name for p in images}) == 3
    annotation = json.loads(jsons[0].read_text())
    assert (annotation["imgHeight"], annotation["imgWidth"]) == (128, 256)
    labels = {o["label"] for o in annotation["objects"]}
    assert {"sky", "road", "building", "ego vehicle"} <= labels and labels <= set(name2label)
    for image in images:
        assert (
            image.name.replace("_leftImg8bit.png", "") == image.name.rsplit("_", 1)[0]
        )  # city_seq_frame


def test_plain_scenes_hold_no_thin_class_and_flat_colours(tmp_path):
    """tools/benchmark_learning.py --data fast: the same scenes without the thin classes
    (cityscapesscripts' ids checked in the labelIds it drew), each region one colour under faint
    noise."""
    synthesize_cityscapes(tmp_path / "s", train=3, val=0, height=128, width=256, seed=4, plain=True)
    thin = {
        name2label[name].id
        for name in (
            "pole",
            "traffic sign",
            "traffic light",
            "wall",
            "fence",
            "rider",
            "bicycle",
            "license plate",
            "static",
        )
    }
    for label_path in sorted((tmp_path / "s").rglob("*_gtFine_labelIds.png")):
        ids = np.array(Image.open(label_path))
        image = np.array(
            Image.open(
                str(label_path)
                .replace("gtFine", "leftImg8bit")
                .replace("_leftImg8bit_labelIds", "_leftImg8bit")
            )
        )
        assert not thin & set(np.unique(ids).tolist()) and {
            name2label["road"].id,
            name2label["sky"].id,
        } <= set(np.unique(ids).tolist())
        sky = image[ids == name2label["sky"].id].astype(float)
        assert (
            np.abs(sky.mean(0) - (135, 175, 215)).max() < 1.5 and sky.std(0).max() < 5
        )  # synthetic.APPEARANCE's sky


@pytest.mark.slow
def test_both_conversion_sources_equal_cityscapesscripts_byte_for_byte(tmp_path):
    synthesize_cityscapes(tmp_path / "poly", train=4, val=2, test=1, height=96, width=192, seed=1)
    shutil.copytree(tmp_path / "poly", tmp_path / "lut")
    assert not convert_dataset(tmp_path / "poly", source="polygons", nproc=2, progress=False)
    assert not convert_dataset(tmp_path / "lut", source="labelIds", progress=False)
    converted = sorted((tmp_path / "poly").glob(f"gtFine/*/*/*{LABEL_SUFFIX}"))
    assert len(converted) == 7
    for path in converted:
        rel = path.relative_to(tmp_path / "poly")
        assert filecmp.cmp(path, tmp_path / "lut" / rel, shallow=False), rel
        official = tmp_path / "official.png"
        json2labelImg(
            str(path).replace(LABEL_SUFFIX, "_gtFine_polygons.json"), str(official), "trainIds"
        )
        assert np.array_equal(np.array(Image.open(official)), np.array(Image.open(path))), rel
    assert (tmp_path / "poly" / "train.txt").read_text() == (
        tmp_path / "lut" / "train.txt"
    ).read_text()


@pytest.mark.slow
def test_conversion_skips_done_files_and_reports_broken_ones(tmp_path):
    synthesize_cityscapes(tmp_path, train=3, val=0, height=64, width=128, seed=2)
    broken = sorted(tmp_path.glob("gtFine/train/*/*_gtFine_labelIds.png"))[0]
    broken.write_bytes(b"garbage")
    result = subprocess.run(
        [sys.executable, "convert_labels.py", str(tmp_path), "--source", "labelIds"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert str(broken) in result.stderr
    assert len(list(tmp_path.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))) == 2
    done = sorted(tmp_path.glob(f"gtFine/train/*/*{LABEL_SUFFIX}"))[0]
    done.write_bytes(b"marker")
    convert_dataset(tmp_path, source="polygons", progress=False)
    assert done.read_bytes() == b"marker"
    convert_dataset(tmp_path, source="polygons", force=True, progress=False)
    assert done.read_bytes() != b"marker"


def test_dataset_finds_the_pairs_and_list_file_agrees_with_scan(synthetic_root, tmp_path):
    listed = find_samples(synthetic_root, "val")
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    (copy / "val.txt").unlink()
    scanned = find_samples(copy, "val")
    assert [
        (i.relative_to(synthetic_root), lb.relative_to(synthetic_root)) for i, lb in listed
    ] == [(i.relative_to(copy), lb.relative_to(copy)) for i, lb in scanned]
    assert len(listed) == 4
    for image, label in listed:
        assert label.name == image.name.replace("_leftImg8bit.png", LABEL_SUFFIX)
    dataset = open_dataset(synthetic_root, "train", dataset_type="cityscapes")
    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image"].shape == (3, 128, 256) and sample["label"].shape == (128, 256)
        seen |= set(np.unique(sample["label"].numpy()).tolist())
        drawn = {
            name2label[o["label"]].trainId
            for o in json.loads(
                Path(dataset.samples[i][1])
                .with_name(
                    Path(dataset.samples[i][1]).name.replace(LABEL_SUFFIX, "_gtFine_polygons.json")
                )
                .read_text()
            )["objects"]
        }
        assert set(np.unique(sample["label"].numpy()).tolist()) <= {
            t if 0 <= t < NUM_CLASSES else IGNORE_INDEX for t in drawn
        } | {IGNORE_INDEX}
    assert {0, 1, 2, 8, 10, 13, IGNORE_INDEX} <= seen


def color_coded_pair(height=96, width=160, seed=0):
    """A label of random rectangles and an image whose colour is the class palette: alignment is
    checkable."""
    rng = np.random.default_rng(seed)
    label = np.full((height, width), 0, dtype=np.uint8)
    for _ in range(25):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        label[y : y + rng.integers(8, 40), x : x + rng.integers(8, 60)] = rng.choice(
            [*range(NUM_CLASSES), IGNORE_INDEX]
        )
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[label < NUM_CLASSES] = PALETTE[label[label < NUM_CLASSES]]
    return image, label


def interior(label, radius):
    """Pixels whose (2r+1)^2 neighbourhood has one class: away from resampling boundaries."""
    padded = np.pad(label.astype(np.int16), radius, constant_values=-1)
    same = np.ones(label.shape, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
    return same


@pytest.mark.parametrize("seed", range(12))
def test_image_and_label_stay_aligned_through_rescale_crop_flip(seed):
    image, label = color_coded_pair(seed=seed)
    transform = TrainTransform(
        crop=(64, 96), scale_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=False
    )
    out_image, out_label = transform(image, label, np.random.default_rng(seed))
    assert out_image.shape == (64, 96, 3) and out_label.shape == (64, 96)
    inside = interior(out_label, 2) & (out_label < NUM_CLASSES)
    assert inside.sum() > 500
    diff = np.abs(out_image[inside].astype(int) - PALETTE[out_label[inside]].astype(int)).max()
    assert diff <= 1


def test_flip_happens_and_keeps_alignment():
    image, label = color_coded_pair(seed=3)
    flips = []
    for seed in range(20):
        transform = TrainTransform(
            crop=(96, 160), scale_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=False
        )
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        assert np.array_equal(out_label, label) or np.array_equal(out_label, label[:, ::-1])
        flips.append(np.array_equal(out_label, label[:, ::-1]))
        assert np.array_equal(out_image, image[:, ::-1] if flips[-1] else image)
    assert 3 < sum(flips) < 17


def test_small_images_are_padded_with_ignore_and_what_normalises_to_zero():
    """mmseg 0.x pipelines run Normalize, then Pad(pad_val=0, seg_pad_val=255) (mmseg 1.x: the data
    preprocessor normalises, then pads with 0): padded pixels reach the network as 0, and their
    labels are ignored."""
    image, label = color_coded_pair(40, 50, seed=1)
    out_image, out_label = TrainTransform(
        crop=(64, 96), scale_range=(1.0, 1.0), cat_max_ratio=1.0, flip_prob=0, photometric=False
    )(image, label, np.random.default_rng(0))
    assert np.array_equal(out_label[:40, :50], label) and np.array_equal(out_image[:40, :50], image)
    assert (out_label[40:] == IGNORE_INDEX).all() and (out_label[:, 50:] == IGNORE_INDEX).all()
    model = BiSeNetV1(ModelConfig(18, 19))
    normalised = (
        torch.from_numpy(out_image).permute(2, 0, 1)[None].float() - model.mean
    ) / model.std
    padded = torch.ones(64, 96, dtype=torch.bool)
    padded[:40, :50] = False
    assert normalised[..., padded].abs().max() <= 0.5 / min(
        model.config.std
    )  # 0 to within uint8 rounding


def max_class_ratio(label):
    counts = np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX]
    return counts.max() / counts.sum()


def test_cat_max_ratio_is_honoured_when_possible():
    """Left 60%: all road. Right 40%: road and sidewalk stripes. Crops 30% wide often land on road
    only."""
    label = np.zeros((64, 200), dtype=np.uint8)
    label[:, 120:][(np.arange(64) // 4 % 2 == 0)] = 1
    image = np.zeros((64, 200, 3), dtype=np.uint8)
    ratios = {}
    for cat_max in (0.75, 1.0):
        transform = TrainTransform(
            crop=(64, 60), scale_range=(1.0, 1.0), cat_max_ratio=cat_max, photometric=False
        )
        ratios[cat_max] = [
            max_class_ratio(transform(image, label, np.random.default_rng(s))[1]) for s in range(40)
        ]
    assert all(r < 0.75 for r in ratios[0.75])
    assert sum(r >= 0.75 for r in ratios[1.0]) > 15


def test_photometric_distortion_changes_only_the_image_and_is_seeded():
    image, label = color_coded_pair(seed=4)
    transform = TrainTransform(
        crop=(96, 160), scale_range=(1.0, 1.0), cat_max_ratio=1.0, flip_prob=0
    )
    changed = 0
    for seed in range(8):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        again, _ = transform(image, label, np.random.default_rng(seed))
        assert np.array_equal(out_label, label) and np.array_equal(out_image, again)
        changed += not np.array_equal(out_image, image)
    assert changed >= 6


def make_broken(root, tmp_path, what):
    broken = tmp_path / what
    shutil.copytree(root, broken)
    image, label = find_samples(broken, "train")[0]
    if what == "missing_label":
        label.unlink()
        (broken / "train.txt").unlink()
        return broken, label
    if what == "size_mismatch":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    elif what == "unreadable":
        image.write_bytes(b"\x89PNG broken")
        return broken, image
    elif what == "bad_values":
        Image.fromarray(np.full((128, 256), 26, np.uint8)).save(label)
    return broken, label


@pytest.mark.parametrize(
    "what, message",
    [
        ("missing_label", "missing label"),
        ("size_mismatch", "label is 10x10"),
        ("unreadable", "unreadable image"),
        ("bad_values", "not trainIds"),
    ],
)
def test_bad_files_raise_one_line_errors_naming_the_file(synthetic_root, tmp_path, what, message):
    broken, path = make_broken(synthetic_root, tmp_path, what)
    with pytest.raises(DataError) as error:
        dataset = open_dataset(broken, "train", dataset_type="cityscapes")
        for i in range(len(dataset)):
            dataset[i]
    assert (
        str(path) in str(error.value)
        and message in str(error.value)
        and "\n" not in str(error.value)
    )


def test_missing_root_and_split_name_the_fix(synthetic_root, tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        open_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="split 'extra' not found"):
        find_samples(synthetic_root, "extra")


@pytest.mark.slow
def test_worker_errors_reach_the_user_as_one_line(synthetic_root, tmp_path):
    broken, label = make_broken(synthetic_root, tmp_path, "bad_values")
    cmd = [
        sys.executable,
        "train.py",
        "--data-root",
        str(broken),
        "--work-dir",
        str(tmp_path / "wd"),
        "--depth",
        "18",
        "--batch-size",
        "2",
    ]
    cmd += ["--crop", "64x64", "--iters", "20", "--workers", "1", "--no-validate"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(label) in last and "Traceback" not in result.stderr


def test_photometric_levels_equal_mmseg_float_formula():

    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for alpha, beta in ((1.0, -31.7), (1.0, 20.2), (1.43, 0.0), (0.51, 0.0)):
        expected = np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        assert np.array_equal(levels(image, alpha, beta), expected)
        assert np.array_equal(
            levels(np.ascontiguousarray(image[..., 1]), alpha, beta), expected[..., 1]
        )


@pytest.mark.parametrize(
    "in_size, out_size", [(100, 60), (100, 166), (1024, 517), (256, 403), (64, 33)]
)
def test_label_resampling_is_cv2s_nearest_exact_and_stays_on_the_image_samples(in_size, out_size):
    """The label crop is cv2.INTER_NEAREST_EXACT of the rescaled label. That is the source pixel
    nearest to where the bilinear image resize (cv2.INTER_LINEAR, the image side) sampled each
    output pixel: a coordinate ramp resized bilinearly says where that was. mmcv's "nearest"
    (cv2.INTER_NEAREST, Ascend ModelZoo's) is up to a whole source pixel away from it, so its
    labels sit off the image they label."""
    start, count = out_size // 5, out_size // 2
    label = np.arange(in_size, dtype=np.uint8)[None, :].repeat(2, 0) if in_size < 256 else None
    exact = datasets.nearest_indices(out_size, in_size, start, count)
    if label is not None:
        resized = cv2.resize(label, (out_size, 2), interpolation=cv2.INTER_NEAREST_EXACT)[
            0, start : start + count
        ]
        centre = (np.arange(start, start + count) + 0.5) * in_size / out_size
        tie = np.isclose(
            centre, np.round(centre)
        )  # on a pixel border: either neighbour is as near (cv2 rounds in fixed point)
        assert (
            np.array_equal(exact[~tie], resized[~tie])
            and np.abs(exact - resized.astype(np.int64)).max() <= 1
        )
    ramp = np.arange(in_size, dtype=np.float32)[None, :].repeat(2, 0)
    sampled_at = cv2.resize(ramp, (out_size, 2), interpolation=cv2.INTER_LINEAR)[
        0, start : start + count
    ]
    inside = (sampled_at > 0) & (
        sampled_at < in_size - 1
    )  # the clamped borders say nothing about the offset
    assert np.abs(exact - sampled_at)[inside].max() <= 0.5 + 1e-4
    seed_nearest = cv2.resize(ramp, (out_size, 2), interpolation=cv2.INTER_NEAREST)[
        0, start : start + count
    ]
    assert np.abs(seed_nearest - sampled_at)[inside].max() > 0.5 + 1e-3
