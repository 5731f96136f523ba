"""Cityscapes: class table, dataset, training/validation transforms and a synthetic dataset generator.

The dataset yields uint8 images (3xHxW, RGB, 0..255) and uint8 trainId labels (HxW, 255 = ignore).
Normalisation happens inside the model, on the device, so host-to-device copies stay uint8.

    python cityscapes.py synthesize OUT_DIR --train 20 --val 6    # a fake Cityscapes, exact layout
"""

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image, ImageDraw

from datasets import IGNORE_INDEX, DataError, DatasetInfo, SegmentationDataset, folder_info, folder_layout, folder_samples, new_dataset_folder, read_classes

TRAIN_LABELS = sorted((lb for lb in CITYSCAPES_LABELS if 0 <= lb.trainId < IGNORE_INDEX), key=lambda lb: lb.trainId)
CLASS_NAMES = [lb.name for lb in TRAIN_LABELS]
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = np.array([lb.color for lb in TRAIN_LABELS], dtype=np.uint8)
TRAINID_TO_LABELID = np.array([lb.id for lb in TRAIN_LABELS], dtype=np.uint8)

LABELID_TO_TRAINID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label in CITYSCAPES_LABELS:
    if _label.id >= 0 and 0 <= _label.trainId < IGNORE_INDEX:
        LABELID_TO_TRAINID[_label.id] = _label.trainId

CITYSCAPES = DatasetInfo(
    "cityscapes",
    tuple(CLASS_NAMES),
    tuple(tuple(int(v) for v in c) for c in PALETTE),
    submission_ids=tuple(int(i) for i in TRAINID_TO_LABELID),
    label_hint="these are not trainIds: did you point at labelIds? run: python convert_labels.py DATA_ROOT",
)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


def find_samples(root, split, with_labels=True):
    """(image_path, label_path | None) pairs of a split, from {root}/{split}.txt when present, else a scan."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found; pass --data-root or run: python cityscapes.py synthesize {root}")
    image_dir = root / "leftImg8bit" / split
    list_file = root / f"{split}.txt"
    listed_labels = None
    if list_file.is_file():
        lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if lines and all("," in line for line in lines):  # CoinCheung's lists: `image,label` relative to the root
            pairs = [[root / part.strip() for part in line.split(",", 1)] for line in lines]
            images, listed_labels = [image for image, _ in pairs], dict((str(image), label) for image, label in pairs)
        else:  # mmseg's: city/city_seq_frame
            images = [image_dir / (stem + IMAGE_SUFFIX) for stem in lines]
        for image in images:
            if not image.is_file():
                raise DataError(f"{image}: listed in {list_file} but missing; fix the list or the files")
    elif image_dir.is_dir():
        images = sorted(p for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}") if p.is_file())
    else:
        raise DataError(f"{image_dir}: split '{split}' not found; expected leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}")
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
            label = root / "gtFine" / split / rel.parent / rel.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX)
        if not label.is_file():
            raise DataError(f"{label}: missing label for {image}; run: python convert_labels.py {root}")
        samples.append((image, label))
    return samples


def sample_name(image_path):
    """'aachen_000000_000019' for a Cityscapes image, the file stem otherwise."""
    name = Path(image_path).name
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else Path(image_path).stem


def CityscapesDataset(root, split, transform=None, with_labels=True, images=None):
    """Cityscapes pairs of a split, or the given images without labels."""
    samples = [(p, None) for p in images] if images is not None else find_samples(root, split, with_labels)
    return SegmentationDataset(samples, CITYSCAPES, transform)


def detect_dataset(root, kind="auto"):
    """'cityscapes' or 'folder': from --dataset, else from the root (leftImg8bit/ -> Cityscapes, else a generic layout)."""
    root = Path(root)
    if kind != "auto":
        return kind
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "classes.txt").is_file() or folder_layout(root):
        return "folder"
    raise DataError(
        f"{root}: neither Cityscapes (leftImg8bit/, gtFine/) nor your own data (classes.txt with img_dir/, train.txt or trainannot/); see README: Your own data"
    )


def open_dataset(root, split, kind="auto", transform=None, with_labels=True):
    """Cityscapes (the default) or your own data in a layout of datasets.py; dataset.info describes its classes."""
    if Path(root).is_file():
        raise DataError(f"{root} is a file; pass the data root, the folder that holds it")
    if not Path(root).is_dir():
        raise DataError(f"{root}: data root not found; pass --data-root, or make a synthetic one: python cityscapes.py synthesize {root}")
    if detect_dataset(root, kind) == "cityscapes":
        if (Path(root) / "classes.txt").is_file() and read_classes(Path(root) / "classes.txt", "cityscapes").class_names != CITYSCAPES.class_names:
            raise DataError(
                f"{Path(root) / 'classes.txt'}: a Cityscapes root (leftImg8bit/) trains Cityscapes' 19 classes, not these; remove classes.txt, "
                "or put your data in one of your own layouts (README: Your own data)"
            )
        return CityscapesDataset(root, split, transform, with_labels)
    return SegmentationDataset(folder_samples(root, split, with_labels), folder_info(root), transform)


def nearest_indices(out_size, in_size, start, count):
    """Source indices of nearest-neighbour resizing in_size -> out_size, for output positions start..start+count."""
    positions = np.arange(start, start + count)
    return np.minimum(((positions + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def affine(image, alpha=1.0, beta=0.0):
    """uint8 clip(image * alpha + beta) truncated, as mmseg computes it in float32, through a 256-entry table."""
    return cv2.LUT(image, np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8))


class TrainTransform:
    """mmseg's Cityscapes recipe: random rescale, random crop with cat_max_ratio, pad, flip, photometric distortion.

    Only the crop is ever resampled: the label crop is read through nearest-neighbour indices and the image crop
    through an affine warp with the rescale's own pixel mapping, which equal the crops of fully resized images
    (to within 1 grey level of cv2.resize, which mmseg uses). Interpolation as in mmseg: bilinear, no antialias.
    """

    def __init__(
        self,
        crop=(1024, 1024),
        scale_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        brightness=32,
        contrast=(0.5, 1.5),
        saturation=(0.5, 1.5),
        hue=18,
        photometric=True,
    ):
        self.crop = crop
        self.scale_range = scale_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, image, label, rng):
        height, width = label.shape
        ratio = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
        crop_h, crop_w = min(self.crop[0], scaled_h), min(self.crop[1], scaled_w)

        def crop_label(top, left):
            rows = nearest_indices(scaled_h, height, top, crop_h)
            cols = nearest_indices(scaled_w, width, left, crop_w)
            return label[rows[:, None], cols[None, :]]

        top, left = rng.integers(scaled_h - crop_h + 1), rng.integers(scaled_w - crop_w + 1)
        label_crop = crop_label(top, left)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                counts = np.bincount(label_crop.ravel(), minlength=256)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = rng.integers(scaled_h - crop_h + 1), rng.integers(scaled_w - crop_w + 1)
                label_crop = crop_label(top, left)

        sy, sx = height / scaled_h, width / scaled_w
        to_source = np.array([[sx, 0, (left + 0.5) * sx - 0.5], [0, sy, (top + 0.5) * sy - 0.5]])
        image_crop = cv2.warpAffine(image, to_source, (crop_w, crop_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)

        if rng.random() < self.flip_prob:
            image_crop, label_crop = image_crop[:, ::-1], label_crop[:, ::-1]
        if self.photometric:
            image_crop = self.distort(np.ascontiguousarray(image_crop), rng)

        out_image = np.zeros((*self.crop, 3), dtype=np.uint8)
        out_label = np.full(self.crop, IGNORE_INDEX, dtype=np.uint8)
        out_image[:crop_h, :crop_w] = image_crop
        out_label[:crop_h, :crop_w] = label_crop
        return out_image, out_label

    def distort(self, image, rng):
        """mmseg's PhotoMetricDistortion: every step rounds to uint8, hue in OpenCV's 0..180 circle, as there."""

        if rng.random() < 0.5:
            image = affine(image, beta=rng.uniform(-self.brightness, self.brightness))
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            image = affine(image, alpha=rng.uniform(*self.contrast))
        change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
        if change_saturation or change_hue:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            if change_saturation:
                hsv[..., 1] = affine(np.ascontiguousarray(hsv[..., 1]), alpha=rng.uniform(*self.saturation))
            if change_hue:
                hsv[..., 0] = ((np.arange(256) + rng.integers(-self.hue, self.hue)) % 180).astype(np.uint8)[hsv[..., 0]]
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and rng.random() < 0.5:
            image = affine(image, alpha=rng.uniform(*self.contrast))
        return image


# ---------------------------------------------------------------------------------------------------------------
# Synthetic Cityscapes: street scenes drawn as polygons, written in the real gtFine JSON format.

CITIES = ("synthburg", "fakefurt", "mockheim")
APPEARANCE = {  # label -> (base RGB, per-object color jitter)
    "sky": ((135, 175, 215), 20),
    "building": ((120, 105, 95), 45),
    "wall": ((170, 160, 140), 20),
    "fence": ((140, 120, 90), 20),
    "vegetation": ((70, 115, 45), 25),
    "terrain": ((150, 160, 90), 20),
    "road": ((85, 85, 90), 10),
    "sidewalk": ((160, 145, 150), 15),
    "pole": ((110, 110, 115), 15),
    "traffic sign": ((210, 190, 40), 40),
    "traffic light": ((40, 40, 35), 10),
    "car": ((120, 120, 130), 110),
    "truck": ((170, 170, 160), 60),
    "bus": ((200, 180, 60), 50),
    "person": ((110, 80, 90), 70),
    "rider": ((140, 60, 60), 60),
    "bicycle": ((50, 50, 60), 30),
    "ego vehicle": ((30, 30, 35), 5),
    "static": ((100, 90, 80), 40),
}


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _blob(rng, cx, cy, rx, ry, points=14):
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.7, 1.0, points)
    return [[cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)] for a, r in zip(angles, radius)]


def synthetic_scene(rng, height, width):
    """Objects in drawing order (later ones cover earlier ones, as in real Cityscapes annotations)."""
    H, W = height, width
    horizon = H * rng.uniform(0.38, 0.5)
    vanish_x = W * rng.uniform(0.35, 0.65)
    objects = [("sky", _box(0, 0, W, horizon + 2))]
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        w = W * rng.uniform(0.08, 0.22)
        objects.append(("building", _box(x, H * rng.uniform(0.03, 0.3), x + w, horizon + H * 0.05)))
        x += w * rng.uniform(0.8, 1.05)
    for _ in range(rng.integers(1, 4)):
        objects.append(("vegetation", _blob(rng, rng.uniform(0, W), horizon - H * 0.05, W * 0.08, H * 0.12)))
    if rng.random() < 0.6:
        x0 = rng.uniform(0, 0.6) * W
        objects.append((rng.choice(["wall", "fence"]), _box(x0, horizon - H * 0.06, x0 + W * 0.3, horizon + H * 0.04)))
    objects.append(("terrain", [[0, horizon + H * 0.03], [W * 0.25, horizon + H * 0.03], [0, H * 0.75]]))
    objects.append(("sidewalk", [[0, H], [0, H * 0.7], [vanish_x - W * 0.05, horizon], [vanish_x, horizon], [W * 0.15, H]]))
    objects.append(("sidewalk", [[W, H], [W, H * 0.7], [vanish_x + W * 0.05, horizon], [vanish_x, horizon], [W * 0.85, H]]))
    objects.append(("road", [[W * 0.12, H], [vanish_x - W * 0.02, horizon], [vanish_x + W * 0.02, horizon], [W * 0.88, H]]))
    for _ in range(rng.integers(2, 5)):
        px = rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)]) * W
        base, top = H * rng.uniform(0.62, 0.85), H * rng.uniform(0.15, 0.3)
        objects.append(("pole", _box(px, top, px + W * 0.006, base)))
        if rng.random() < 0.7:
            kind = rng.choice(["traffic sign", "traffic light"])
            s = W * 0.02
            objects.append((kind, _box(px - s / 2, top, px + s, top + (s if kind == "traffic sign" else 2 * s))))
    for _ in range(rng.integers(1, 5)):
        y = rng.uniform(horizon + H * 0.05, H * 0.85)
        scale = (y - horizon) / (H - horizon)
        cx = vanish_x + (rng.uniform(-0.7, 0.7) * W * 0.5) * scale
        kind = rng.choice(["car", "car", "car", "truck", "bus"])
        w = W * 0.25 * scale * (1.6 if kind != "car" else 1.0)
        h = w * (0.55 if kind == "car" else 0.9)
        body = [[cx - w / 2, y], [cx - w / 2, y - h * 0.55], [cx - w * 0.3, y - h], [cx + w * 0.3, y - h]]
        body += [[cx + w / 2, y - h * 0.55], [cx + w / 2, y]]
        objects.append((kind, body))
        if rng.random() < 0.3:
            objects.append(("license plate", _box(cx - w * 0.08, y - h * 0.25, cx + w * 0.08, y - h * 0.15)))
    for _ in range(rng.integers(1, 5)):
        y = rng.uniform(horizon + H * 0.1, H * 0.95)
        scale = (y - horizon) / (H - horizon)
        side = rng.choice([-1, 1])
        cx = vanish_x + side * rng.uniform(0.45, 0.9) * W * 0.5 * scale
        h, w = H * 0.45 * scale, W * 0.03 * scale
        if rng.random() < 0.25:
            objects.append(("bicycle", _box(cx - 2.5 * w, y - h * 0.35, cx + 2.5 * w, y)))
            objects.append(("rider", _blob(rng, cx, y - h * 0.65, w, h * 0.35, 10)))
        else:
            objects.append(("person", [[cx - w, y], [cx - w, y - h * 0.8], [cx, y - h], [cx + w, y - h * 0.8], [cx + w, y]]))
    if rng.random() < 0.5:
        x0 = rng.uniform(0, W * 0.9)
        objects.append(("static", _box(x0, H * 0.8, x0 + W * 0.04, H * 0.9)))
    objects.append(("ego vehicle", [[0, H], [0, H * 0.93], [W / 2, H * 0.9], [W, H * 0.93], [W, H]]))
    return [(label, [[int(round(px)), int(round(py))] for px, py in poly]) for label, poly in objects]


def render_image(objects, rng, height, width):
    """Per-object colour, then shading, lighting gradient and sensor noise, so classes are not colour-coded."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for label, polygon in objects:
        base, jitter = APPEARANCE.get(label, ((128, 128, 128), 0))
        color = np.clip(np.array(base) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
        draw.polygon([tuple(p) for p in polygon], fill=tuple(int(c) for c in color))
    pixels = np.asarray(image).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light = rng.uniform(0.75, 1.2) * (1 + 0.25 * (xs / width - 0.5) * rng.uniform(-1, 1) + 0.1 * np.sin(ys / 37.0))
    texture = rng.normal(0, rng.uniform(4, 12), (height, width, 1)) + rng.normal(0, 4, pixels.shape)
    return np.clip(pixels * light[..., None] + texture, 0, 255).astype(np.uint8)


def synthesize_one(job):
    """One image of a split: leftImg8bit PNG, gtFine polygons JSON, labelIds PNG drawn by cityscapesscripts."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    out, split_index, split, i, height, width, seed = job
    rng = np.random.default_rng([seed, split_index, i])
    city = CITIES[i % len(CITIES)]
    stem = f"{city}_{i // len(CITIES):06d}_{19 + i:06d}"
    objects = synthetic_scene(rng, height, width)
    image_dir, label_dir = out / "leftImg8bit" / split / city, out / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_image(objects, rng, height, width)).save(image_dir / f"{stem}{IMAGE_SUFFIX}")
    annotation = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [
            {"date": "", "deleted": 0, "id": k, "label": label, "polygon": poly, "user": "synthetic", "verified": 0} for k, (label, poly) in enumerate(objects)
        ],
    }
    json_path = label_dir / f"{stem}_gtFine_polygons.json"
    json_path.write_text(json.dumps(annotation, indent=1))
    json2labelImg(str(json_path), str(label_dir / f"{stem}_gtFine_labelIds.png"), "ids")


def synthesize(out_dir, train=20, val=6, test=0, height=512, width=1024, seed=0, nproc=1):
    """Write leftImg8bit PNGs, gtFine polygons JSON and labelIds PNGs; each image depends only on (seed, split, index)."""
    out = new_dataset_folder(out_dir)
    jobs = [(out, k, split, i, height, width, seed) for k, (split, count) in enumerate((("train", train), ("val", val), ("test", test))) for i in range(count)]
    if nproc > 1 and len(jobs) > 1:
        with Pool(nproc) as pool:
            pool.map(synthesize_one, jobs, chunksize=1)
    else:
        for job in jobs:
            synthesize_one(job)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthesize", help="write a synthetic dataset in the exact Cityscapes layout")
    synth.add_argument("out_dir")
    synth.add_argument("--train", type=int, default=20)
    synth.add_argument("--val", type=int, default=6)
    synth.add_argument("--test", type=int, default=0)
    synth.add_argument("--height", type=int, default=1024)
    synth.add_argument("--width", type=int, default=2048)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--nproc", type=int, default=1, help="parallel processes")
    args = parser.parse_args()
    try:
        synthesize(args.out_dir, args.train, args.val, args.test, args.height, args.width, args.seed, args.nproc)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.train} train, {args.val} val, {args.test} test images to {args.out_dir}")


if __name__ == "__main__":
    main()
