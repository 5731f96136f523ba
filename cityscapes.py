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

# trainIds 0..18, one label each
TRAIN_LABELS = sorted(
    (lb for lb in CITYSCAPES_LABELS if 0 <= lb.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId
)
NUM_CLASSES = len(TRAIN_LABELS)
PALETTE = np.array([lb.color for lb in TRAIN_LABELS], dtype=np.uint8)
TRAINID_TO_LABELID = np.array([lb.id for lb in TRAIN_LABELS], dtype=np.uint8)
LABELID_TO_TRAINID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
LABELID_TO_TRAINID[TRAINID_TO_LABELID] = np.arange(NUM_CLASSES)

CITYSCAPES = DatasetInfo(
    "cityscapes",
    tuple(lb.name for lb in TRAIN_LABELS),
    tuple(map(tuple, PALETTE.tolist())),
    submission_ids=tuple(TRAINID_TO_LABELID.tolist()),
    label_hint="these are not trainIds: did you point at labelIds? "
    "run: python convert_labels.py DATA_ROOT",
)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def find_samples(root, split, *, with_labels=True):
    """(image_path, label_path | None) of a split, from ROOT/{split}.txt if there, else a scan."""
    root = Path(root)
    image_dir, list_file, listed = root / "leftImg8bit" / split, root / f"{split}.txt", {}
    if list_file.is_file():
        lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if lines and all("," in line for line in lines):  # CoinCheung's: `image,label` from root
            pairs = [[root / part.strip() for part in line.split(",", 1)] for line in lines]
            images, listed = [image for image, _ in pairs], dict(pairs)
        else:  # mmseg's: city/city_seq_frame
            images = [image_dir / (stem + IMAGE_SUFFIX) for stem in lines]
        for image in images:
            if not image.is_file():
                missing = f"listed in {list_file} but missing"
                raise DataError(f"{image}: {missing}; fix the list or the files")
    elif image_dir.is_dir():
        images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    else:
        expected = f"expected leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}"
        raise DataError(f"{image_dir}: split '{split}' not found; {expected}")
    if not images:
        raise DataError(f"{image_dir}: no *{IMAGE_SUFFIX} images in split '{split}'")
    if not with_labels:
        return [(image, None) for image in images]
    gt_dir = root / "gtFine" / split
    for image in images:
        if image not in listed:
            rel = image.relative_to(image_dir)
            listed[image] = gt_dir / rel.parent / rel.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX)
        if not listed[image].is_file():
            convert = f"run: python convert_labels.py {root}"
            raise DataError(f"{listed[image]}: missing label for {image}; {convert}")
    return [(image, listed[image]) for image in images]


def sample_name(image_path):
    """'aachen_000000_000019' for a Cityscapes image, the file stem otherwise."""
    name = Path(image_path).name
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else Path(image_path).stem


# -- Any data root: Cityscapes, or your own data (interop.py) --------------------------------------
def detect_dataset(root, dataset_type="auto"):
    """'cityscapes' or 'folder': --dataset, else the root's files (leftImg8bit/: Cityscapes, else
    your own)."""
    if dataset_type != "auto":
        return dataset_type
    root = Path(root)
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    from interop import folder_layout  # your own data's layouts: read only for such a root

    if (root / "classes.txt").is_file() or folder_layout(root):
        return "folder"
    yours = "your own data (classes.txt with img_dir/, train.txt or trainannot/)"
    raise DataError(
        f"{root}: neither Cityscapes (leftImg8bit/, gtFine/) nor {yours}; see docs/your-data.md"
    )


def open_dataset(root, split, *, dataset_type="auto", transform=None, with_labels=True):
    """A data root's split: Cityscapes, or your own data (interop.py); dataset.info describes its
    classes. A Cityscapes root's classes.txt that names other classes is refused first."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file; pass the data root, the folder that holds it")
    if not root.is_dir():
        make = f"python tools/synthetic.py cityscapes {root}"
        raise DataError(
            f"{root}: data root not found; pass --data-root, or make a synthetic one: {make}"
        )
    if detect_dataset(root, dataset_type) != "cityscapes":
        from interop import folder_info, folder_samples

        samples, info = folder_samples(root, split, with_labels=with_labels), folder_info(root)
        return SegmentationDataset(samples, info, transform=transform)
    if (classes_file := root / "classes.txt").is_file():
        from interop import read_classes

        if read_classes(classes_file, "cityscapes").class_names != CITYSCAPES.class_names:
            not_these = "a Cityscapes root (leftImg8bit/) trains Cityscapes' 19 classes, not these"
            fix = "remove classes.txt, or put your data in one of your own layouts"
            raise DataError(f"{classes_file}: {not_these}; {fix} (docs/your-data.md)")
    samples = find_samples(root, split, with_labels=with_labels)
    return SegmentationDataset(samples, CITYSCAPES, transform=transform)
