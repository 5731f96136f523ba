"""docs/how-to-change.md as written: each change's diff applies to this tree and touches one
function in one file (plus at most a flag's choices), and the new loss, head, data layout and
schedule train."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image
from test_train import SMALL

from interop import image_files

PAGE = ROOT / "docs" / "how-to-change.md"


def changes():
    """{section title: its diff}, for the sections that show one, in page order."""
    sections = re.split(r"^## ", PAGE.read_text(), flags=re.M)[1:]
    found = {s.splitlines()[0]: re.search(r"```diff\n(.*?)```", s, re.S) for s in sections}
    return {title: diff[1] for title, diff in found.items() if diff}


def applied(diff, tmp_path):
    """A copy of the repository with `diff` applied."""
    tree = tmp_path / "tree"
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    for name in names:
        if (ROOT / name).is_file() and not name.startswith((".venv", "docs/")):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    (tmp_path / "change.diff").write_text(diff)
    result = subprocess.run(
        ["git", "apply", str(tmp_path / "change.diff")], cwd=tree, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return tree


def test_each_change_touches_one_function_in_one_file():
    found = changes()
    assert list(found) == [
        "A new loss",
        "A new head",
        "A new dataset layout",
        "A new learning-rate schedule",
    ]
    for title, diff in found.items():
        files = re.findall(r"^\+\+\+ b/(\S+)", diff, re.M)
        hunks = re.findall(r"^@@ .* @@ ?(.*)$", diff, re.M)
        assert len(set(files)) == 1, (title, files)
        changed = [h for h in hunks if "add_argument" not in h and "def add_" not in h]
        assert len(set(changed)) <= 1, (title, hunks)  # one function, besides a flag's choices


def train_step_in(tree, *flags):
    command = [
        sys.executable,
        "train.py",
        *map(str, flags),
        *SMALL,
        "--iters",
        "1",
        "--no-validate",
    ]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_new_loss_and_schedule_train_a_step(synthetic_root, tmp_path):
    found = changes()
    tree = applied(found["A new loss"], tmp_path / "loss")
    train_step_in(
        tree, "--data-root", synthetic_root, "--work-dir", tmp_path / "wd1", "--loss", "dice"
    )
    tree = applied(found["A new learning-rate schedule"], tmp_path / "schedule")
    flags = [
        "--data-root",
        synthetic_root,
        "--work-dir",
        tmp_path / "wd2",
        "--lr-schedule",
        "cosine",
    ]
    train_step_in(tree, *flags)


@pytest.mark.slow
def test_the_new_head_trains_and_fine_tunes_on_other_classes(synthetic_root, my7, tmp_path):
    tree = applied(changes()["A new head"], tmp_path)
    train_step_in(tree, "--data-root", synthetic_root, "--work-dir", tmp_path / "city")
    data7, _ = my7
    flags = [
        "--data-root",
        data7,
        "--work-dir",
        tmp_path / "mine",
        "--load-from",
        tmp_path / "city" / "latest.pth",
    ]
    result = train_step_in(tree, *flags)
    assert "the 4 classifier layers are re-initialised" in result.stdout + result.stderr


def voc_layout(source, root):
    """A dataset of synthesize_folder's mmseg layout, rewritten in PASCAL VOC's: JPEGImages/*.jpg,
    SegmentationClass/*.png, ImageSets/Segmentation/{split}.txt of stems, and its classes.txt."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for split in ("train", "val"):
        images = image_files(source / "img_dir" / split)
        stems = [f"{split}_{k}" for k in range(len(images))]
        for stem, image in zip(stems, images):
            Image.open(image).convert("RGB").save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
            relative = image.relative_to(source / "img_dir" / split).with_suffix(".png")
            label = source / "ann_dir" / split / relative
            shutil.copy(label, root / "SegmentationClass" / f"{stem}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    shutil.copy(source / "classes.txt", root / "classes.txt")
    return root


@pytest.mark.slow
def test_the_new_dataset_layout_trains(my7, tmp_path):
    tree = applied(changes()["A new dataset layout"], tmp_path)
    voc = voc_layout(my7[0], tmp_path / "voc")
    train_step_in(tree, "--data-root", voc, "--work-dir", tmp_path / "wd")
