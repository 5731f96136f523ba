"""Cityscapes, the default dataset: its class table (from cityscapesscripts) and its file layout;
and open_dataset, which opens any data root: Cityscapes, or your own data (interop.py's layouts).

ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png  (convert_labels.py ROOT)
ROOT/{split}.txt  optional: mmseg's `city/city_seq_frame` lines or CoinCheung's `image,label` lines
"""

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from cli import DataError
from datasets import IGNORE_INDEX, DatasetInfo, SegmentationDataset

TRAIN_LABELS = sorted(
    (lb for lb in CITYSCAPES_LABELS if 0 <= lb.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId
)
CLASS_NAMES = [lb.name for lb in TRAIN_LABELS]
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = np.array([lb.color for lb in TRAIN_LABELS], dtype=np.uint8)
TRAINID_TO_LABELID = np.array([lb.id for lb in TRAIN_LABELS], dtype=np.uint8)

LABELID_TO_TRAINID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label in CITYSCAPES_LABELS:
    if _label.id >= 0 and 0 <= _label.trainId < IGNORE_INDEX:
        LABELID_TO_TRAINID[_label.id] = _label.trainId

LABEL_HINT = (
    "these are not trainIds: did you point at labelIds? run: python convert_labels.py DATA_ROOT"
)
CITYSCAPES = DatasetInfo(
    "cityscapes",
    tuple(CLASS_NAMES),
    tuple(map(tuple, PALETTE.tolist())),
    submission_ids=tuple(TRAINID_TO_LABELID.tolist()),
    label_hint=LABEL_HINT,
)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def find_samples(root, split, *, with_labels=True):
    """(image_path, label_path | None) of a split, from ROOT/{split}.txt if there, else a scan."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    list_file = root / f"{split}.txt"
    listed_labels = None
    if list_file.is_file():
        lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        # CoinCheung's lists: `image,label` relative to the root
        if lines and all("," in line for line in lines):
            pairs = [[root / part.strip() for part in line.split(",", 1)] for line in lines]
            images = [image for image, _ in pairs]
            listed_labels = {str(image): label for image, label in pairs}
        else:  # mmseg's: city/city_seq_frame
            images = [image_dir / (stem + IMAGE_SUFFIX) for stem in lines]
        for image in images:
            if not image.is_file():
                raise DataError(
                    f"{image}: listed in {list_file} but missing; fix the list or the files"
                )
    elif image_dir.is_dir():
        images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    else:
        expected = f"expected leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}"
        raise DataError(f"{image_dir}: split '{split}' not found; {expected}")
    if not images:
        raise DataError(f"{image_dir}: no *{IMAGE_SUFFIX} images in split '{split}'")
    if not with_labels:
        return [(image, None) for image in images]
    samples = []
    for image in images:
        if listed_labels is not None:
            label = listed_labels[str(image)]
        else:
            rel = image.relative_to(image_dir)
            label = (
                root / "gtFine" / split / rel.parent / rel.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX)
            )
        if not label.is_file():
            raise DataError(
                f"{label}: missing label for {image}; run: python convert_labels.py {root}"
            )
        samples.append((image, label))
    return samples


def sample_name(image_path):
    """'aachen_000000_000019' for a Cityscapes image, the file stem otherwise."""
    name = Path(image_path).name
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else Path(image_path).stem


def cityscapes_info(root):
    """A Cityscapes root's classes: Cityscapes' 19, refusing a classes.txt that names others."""
    classes_file = Path(root) / "classes.txt"
    if classes_file.is_file():
        from interop import read_classes

        if read_classes(classes_file, "cityscapes").class_names != CITYSCAPES.class_names:
            not_these = "a Cityscapes root (leftImg8bit/) trains Cityscapes' 19 classes, not these"
            fix = "remove classes.txt, or put your data in one of your own layouts"
            raise DataError(f"{classes_file}: {not_these}; {fix} (docs/your-data.md)")
    return CITYSCAPES


# -- Any data root: Cityscapes, or your own data (interop.py) --------------------------------------
def detect_dataset(root, dataset_type="auto"):
    """'cityscapes' or 'folder': --dataset, else the root's files (leftImg8bit/: Cityscapes, else
    your own)."""
    root = Path(root)
    if dataset_type != "auto":
        return dataset_type
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    from interop import (
        folder_layout,
    )  # your own data's layouts, read only for a root that is not Cityscapes

    if (root / "classes.txt").is_file() or folder_layout(root):
        return "folder"
    yours = "your own data (classes.txt with img_dir/, train.txt or trainannot/)"
    raise DataError(
        f"{root}: neither Cityscapes (leftImg8bit/, gtFine/) nor {yours}; see docs/your-data.md"
    )


def open_dataset(root, split, *, dataset_type="auto", transform=None, with_labels=True):
    """A data root's split: Cityscapes, or your own data (interop.py); dataset.info describes its
    classes."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file; pass the data root, the folder that holds it")
    if not root.is_dir():
        make = f"python tools/synthetic.py cityscapes {root}"
        raise DataError(
            f"{root}: data root not found; pass --data-root, or make a synthetic one: {make}"
        )
    if detect_dataset(root, dataset_type) == "cityscapes":
        info = cityscapes_info(root)  # a classes.txt that names other classes is said first
        samples = find_samples(root, split, with_labels=with_labels)
    else:
        from interop import folder_info, folder_samples

        samples, info = folder_samples(root, split, with_labels=with_labels), folder_info(root)
    return SegmentationDataset(samples, info, transform=transform)
