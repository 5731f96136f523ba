"""Write a copy of a dataset with its label values mapped, e.g. binary masks saved as 0/255 where
255 is the foreground (train.py refuses those: 255 is the ignore value):

    python tools/map_labels.py data/masks data/masks_01 --map 255=1
    python tools/map_labels.py data/mine data/mine_fixed --map 1=0,2=1,0=255

Every file of ROOT appears in OUT as a copy of its own, so that editing OUT (classes.txt, a split
list, an image) never edits ROOT; the labels of each split that train.py and evaluate.py read are
written anew, mapped, as grey PNGs. --link-images saves the disk space of the images: they become
hard links to ROOT's, the same files under a second name, so an image edited in place (as most image
writers save, PIL's and OpenCV's included) then changes in ROOT too; text files and labels are
copies even then. ROOT is never changed. The last line printed is JSON.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from cityscapes import open_dataset
from cli import atomic_write
from datasets import DataError


def value_map(text):
    """'255=1,3=2' -> a 256-entry table that maps those values and keeps the others."""
    table = np.arange(256, dtype=np.uint8)
    try:
        for pair in text.split(","):
            source, target = (int(v) for v in pair.split("="))
            if not (0 <= source <= 255 and 0 <= target <= 255):
                raise ValueError
            table[source] = target
    except ValueError:
        raise cli.UsageError(
            f"--map {text}: expected FROM=TO pairs of values 0..255, e.g. 255=1 or 1=0,2=1"
        ) from None
    return table


def split_files(root, dataset_type):
    """The image and label files of the splits found under root (a split not there is skipped)."""
    pairs = []
    for split in ("train", "val", "test"):
        try:
            pairs += open_dataset(root, split, dataset_type=dataset_type).samples
        except DataError as e:
            if f"split '{split}' not found" not in str(e):
                raise
    labels = sorted({label for _, label in pairs if label})
    outside = [label for label in labels if not label.resolve().is_relative_to(root.resolve())]
    if outside:
        where = "map_labels.py writes labels inside the data root only"
        raise DataError(f"{outside[0]}: a label outside {root}; {where}")
    if not labels:
        raise DataError(f"{root}: no labelled split (train, val or test) found")
    return sorted({image for image, _ in pairs}), labels


def copy_tree(root, out, *, skip, link):
    """Copies root to out, but for the files at the paths in `skip` (left out) and `link` (hard
    links where the filesystem allows); returns the number of links made."""
    linked = 0

    def copy(source, target):
        nonlocal linked
        if Path(target) in skip:
            return
        if Path(target) in link:
            try:
                os.link(source, target)
                linked += 1
                return
            except OSError:
                pass  # another filesystem, or one without hard links: a copy
        shutil.copy2(source, target)

    shutil.copytree(root, out, copy_function=copy, dirs_exist_ok=True)
    return linked


def map_labels(root, out, table, *, dataset_type="auto", link_images=False):
    images, labels = split_files(root, dataset_type)
    if out.exists() and any(out.iterdir()):
        raise cli.UsageError(f"{out} exists and is not empty; pass a new folder as OUT")
    targets = {label: out / label.relative_to(root) for label in labels}
    inside = [image for image in images if image.resolve().is_relative_to(root.resolve())]
    shared = {out / image.relative_to(root) for image in inside} if link_images else set()
    linked = copy_tree(root, out, skip=set(targets.values()), link=shared - set(targets.values()))
    changed = 0
    for label, target in targets.items():
        with Image.open(label) as png:
            values = np.array(png).astype(np.uint8)
        if values.ndim != 2:
            raise DataError(
                f"{label}: not a single-channel label PNG; map_labels.py maps class indices"
            )
        with atomic_write(target, suffix=".tmp.png") as temp:
            Image.fromarray(table[values]).save(temp, format="PNG")
        changed += int((table[values] != values).any())
    summary = {"labels": len(labels), "labels_changed": changed, "linked_images": linked}
    return summary | {"out": str(out)}


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("root", type=Path, help="the dataset to copy")
    parser.add_argument("out", type=Path, help="a new folder for the copy")
    parser.add_argument("--map", required=True, help="FROM=TO pairs, comma-separated")
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=cli.DATASET_TYPES,
        help="the layout, as train.py's --dataset",
    )
    parser.add_argument(
        "--link-images",
        action="store_true",
        help="hard-link the images instead of copying them (an image edited in place then changes "
        "in ROOT too)",
    )
    args = parser.parse_args(argv)
    cli.main(
        lambda: print(
            json.dumps(
                map_labels(
                    args.root,
                    args.out,
                    value_map(args.map),
                    dataset_type=args.dataset,
                    link_images=args.link_images,
                )
            )
        )
    )


if __name__ == "__main__":
    main()
