"""Write a copy of a dataset with its label values mapped, e.g. binary masks saved as 0/255 where 255 is the
foreground (train.py refuses those: 255 is the ignore value):

    python tools/map_labels.py data/masks data/masks_01 --map 255=1
    python tools/map_labels.py data/mine data/mine_fixed --map 1=0,2=1,0=255

Every file of ROOT appears in OUT (hard links where the filesystem allows, else copies); the labels of each split
that train.py and evaluate.py read are written anew, mapped, as grey PNGs. ROOT is never changed. The last line
printed is JSON.
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
from datasets import DataError, open_dataset


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


def label_files(root, dataset_type):
    """Every label file of the splits found under root (a split that is not there is skipped)."""
    labels = []
    for split in ("train", "val", "test"):
        try:
            labels += [
                label
                for _, label in open_dataset(root, split, dataset_type=dataset_type).samples
                if label
            ]
        except DataError as e:
            if f"split '{split}' not found" not in str(e):
                raise
    outside = [label for label in labels if not label.resolve().is_relative_to(root.resolve())]
    if outside:
        raise DataError(
            f"{outside[0]}: a label outside {root}; map_labels.py writes labels inside the data root only"
        )
    if not labels:
        raise DataError(f"{root}: no labelled split (train, val or test) found")
    return sorted(set(labels))


def link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def map_labels(root, out, table, *, dataset_type="auto"):
    labels = label_files(root, dataset_type)
    if out.exists() and any(out.iterdir()):
        raise cli.UsageError(f"{out} exists and is not empty; pass a new folder as OUT")
    shutil.copytree(root, out, copy_function=link_or_copy, dirs_exist_ok=True)
    changed = 0
    for label in labels:
        with Image.open(label) as png:
            values = np.array(png).astype(np.uint8)
        if values.ndim != 2:
            raise DataError(
                f"{label}: not a single-channel label PNG; map_labels.py maps class indices"
            )
        target = out / label.relative_to(root)
        target.unlink()  # a hard link to the original: write a new file, never through the link
        Image.fromarray(table[values]).save(target, format="PNG")
        changed += int((table[values] != values).any())
    return {"labels": len(labels), "labels_changed": changed, "out": str(out)}


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
    args = parser.parse_args(argv)
    cli.main(
        lambda: print(
            json.dumps(
                map_labels(args.root, args.out, value_map(args.map), dataset_type=args.dataset)
            )
        )
    )


if __name__ == "__main__":
    main()
