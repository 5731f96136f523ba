"""Your own data: the dataset description that travels with every checkpoint, the reading code all datasets share,
and the layouts users already keep segmentation data in. Cityscapes' layout and class table are in cityscapes.py.

    ROOT/classes.txt          one class per line, in index order: `name`, `name R G B`, `name,R,G,B` or `name #rrggbb`
    mmseg's custom layout     ROOT/img_dir/{train,val,test}/**/*.{jpg,png} and ROOT/ann_dir/{train,val}/**/*.png
    CoinCheung's list files   ROOT/train.txt, ROOT/val.txt: `image_path,label_path` per line (relative to ROOT or absolute)
    CamVid, as SegNet ships   ROOT/{train,val,test}/*.png and ROOT/{train,val,test}annot/*.png; 11 classes, 11 = void

Labels hold class indices (0..C-1, 255 = ignore) as 8-bit grey, palette ("P") or 1-bit PNGs, as VOC-style and mask
tools write them; images and labels are turned by their own EXIF orientation alike.

    python datasets.py synthesize OUT --classes 7 [--layout mmseg|list|camvid]    # synthetic data of any class count
"""

import dataclasses
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

import cli

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("mmseg", "list", "camvid")

cv2.setNumThreads(0)  # parallelism comes from DataLoader workers, as in mmseg


class DataError(Exception):
    """Bad input data. The message names the file and the fix."""

    def __str__(self):
        # DataLoader workers re-raise with their traceback prepended; the message proper is the last line.
        text = super().__str__().strip().splitlines()[-1]
        return re.sub(r"^[\w.]*DataError: ", "", text)


def voc_palette(count):
    """PASCAL VOC's colour for class k (bits of k spread over R, G, B): distinct, and familiar from VOC tools."""
    colors = []
    for k in range(count):
        r = g = b = 0
        for shift in range(7, -1, -1):
            r |= ((k >> 0) & 1) << shift
            g |= ((k >> 1) & 1) << shift
            b |= ((k >> 2) & 1) << shift
            k >>= 3
        colors.append((r, g, b))
    return colors


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model's outputs mean: class names and colours in index order, the ignore index, a label value read as
    ignore (CamVid's void), and the ids the benchmark server wants per class (Cityscapes' labelIds)."""

    name: str
    class_names: tuple
    palette: tuple
    ignore_index: int = IGNORE_INDEX
    void_value: int | None = None
    submission_ids: tuple | None = None
    label_hint: str = ""  # the usual cause of bad label values in this dataset, with the fix

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def colors(self):
        return np.array(self.palette, dtype=np.uint8)

    def label_table(self):
        """(valid, index): which 8-bit label values are allowed, and the class index (or ignore) each one means."""
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes] = valid[self.ignore_index] = True
        index = np.arange(256, dtype=np.uint8)
        if self.void_value is not None:
            valid[self.void_value], index[self.void_value] = True, self.ignore_index
        return valid, index

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        values["class_names"] = tuple(values["class_names"])
        values["palette"] = tuple(tuple(c) for c in values["palette"])
        if values.get("submission_ids") is not None:
            values["submission_ids"] = tuple(values["submission_ids"])
        return cls(**values)


CAMVID = DatasetInfo(  # SegNet's CamVid: 11 classes in this order, colours from its tutorial, 11 = void
    "camvid",
    ("sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian", "bicyclist"),
    (
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ),
    void_value=11,
)


def unnamed_classes(count):
    """The classes of a model that does not say what they are: numbered names and a palette of their number."""
    return DatasetInfo("unnamed classes", tuple(f"class{k}" for k in range(count)), tuple(voc_palette(count)))


def classes_text(path):
    """classes.txt as text: UTF-8 (a BOM allowed) or UTF-16 with its BOM; anything else is named, not guessed."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-16") if data.startswith((b"\xff\xfe", b"\xfe\xff")) else data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (Latin-1?); save it as UTF-8") from None


def read_classes(path, name):
    """ROOT/classes.txt -> DatasetInfo. Every line but empty ones and `# comments` is a class, in index order:
    `name`, `name R G B` or `name,R,G,B` (CSV), the colour 0..255 each or `#rrggbb`; a name may contain spaces and
    end in one number."""
    names, colors, lines = [], [], {}
    for number, line in enumerate(classes_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if re.match(r"#(\s|$)", line.lstrip()):  # `# ...` is a comment
            continue
        if line.lstrip().startswith("#"):  # `#unlabelled`: a class or a comment? Skipping it would shift every index after it
            raise DataError(f"{where}: {line.strip()!r}: a comment is `# text` (with a space); rename the class if it is one")
        words = [w.strip() for w in line.split(",")] if "," in line else line.split()
        numbers = next((k for k in range(len(words), 0, -1) if all(re.fullmatch(r"[-+]?\d+(\.\d*)?", w) for w in words[-k:])), 0)
        color = None
        if re.fullmatch(r"#[0-9a-fA-F]{6}", words[-1]):
            words, color = words[:-1], tuple(int(words[-1][i : i + 2], 16) for i in (1, 3, 5))
        elif numbers >= 3 or (numbers == 2 and len(words) > 2) or ("," in line and len(words) > 1):  # a CSV header is refused here
            tail = words[-3:]
            if not (len(words) > 3 and numbers >= 3 and all(re.fullmatch(r"\d+", w) and int(w) <= 255 for w in tail)):
                raise DataError(f"{where}: {line.strip()!r}: expected `name R G B` with three whole numbers 0..255 (or `#rrggbb`)")
            words, color = words[:-3], tuple(int(w) for w in tail)
        elif "#" in line:
            raise DataError(f"{where}: {line.strip()!r}: a colour is `#rrggbb` or `R G B`")
        label = " ".join(words)
        if not label:
            raise DataError(f"{where}: {line.strip()!r}: the class has no name")
        if label in lines:
            raise DataError(f"{where}: the class name {label!r} is on line {lines[label]} already; class names must differ")
        lines[label] = number
        names.append(label)
        colors.append(color)
    if not 2 <= len(names) <= IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes; expected 2 to 255, one `name [R G B]` per line")
    defaults = voc_palette(len(names))
    return DatasetInfo(name, tuple(names), tuple(c or d for c, d in zip(colors, defaults)))


EXIF_ORIENTATION = 0x0112


def exif_orientation(file):
    """The EXIF orientation (1-8; 1: as stored) of an opened PIL image, from the header only (PIL's getexif would
    decode a whole PNG to look for it)."""
    data = file.info.get("exif")
    if not data:
        return 1
    exif = Image.Exif()
    exif.load(data)
    return exif.get(EXIF_ORIENTATION, 1)


def oriented(pixels, orientation):
    """The stored pixel grid as a viewer shows it: EXIF orientations 2-8 are mirrorings and quarter turns."""
    transpose = lambda p: p.swapaxes(0, 1)  # noqa: E731
    turn = {
        2: lambda p: p[:, ::-1],
        3: lambda p: p[::-1, ::-1],
        4: lambda p: p[::-1],
        5: transpose,
        6: lambda p: transpose(p)[:, ::-1],
        7: lambda p: transpose(p)[::-1, ::-1],
        8: lambda p: transpose(p)[::-1],
    }.get(orientation)
    return np.ascontiguousarray(turn(pixels)) if turn else pixels


def read_image(path):
    """RGB uint8 HxWx3, turned by its EXIF orientation as read_label turns labels."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DataError(f"{path}: unreadable image; re-extract or re-download this file")
    try:
        with Image.open(path) as file:
            orientation = exif_orientation(file)
    except OSError:  # a file OpenCV reads and PIL does not: no EXIF either
        orientation = 1
    return oriented(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), orientation)


def read_label(path, info):
    """Class indices uint8 HxW (ignore = 255), from a grey, palette or 1-bit PNG, turned by its EXIF orientation as
    read_image turns images; values outside the dataset's are an error."""
    try:
        with Image.open(path) as png:
            mode, orientation = png.mode, exif_orientation(png)
            # PIL keeps palette indices (OpenCV expands them to colours) and 1-bit values as 0/1 (OpenCV: 0/255)
            label = np.array(png).astype(np.uint8) if mode in ("P", "1") else None
    except OSError:
        label, orientation = None, 1
    if label is None:
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DataError(f"{path}: unreadable label PNG; re-create or re-convert it")
    label = oriented(label, orientation)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(
            f"{path}: a label must be a single-channel 8-bit PNG of class indices (grey or palette), not colours; {info.label_hint or 'convert it'}"
        )
    valid, index = info.label_table()
    if not valid[label].all():
        bad = sorted(set(np.unique(label).tolist()) - set(np.flatnonzero(valid).tolist()))
        void = f", {info.void_value} (void)" if info.void_value is not None else ""
        raise DataError(
            f"{path}: label values {bad[:8]} are not classes of {info.name} (0..{info.num_classes - 1}{void} or 255 = ignore); {info.label_hint or 'fix the labels or classes.txt'}"
        )
    return index[label] if info.void_value is not None else label


def image_files(folder):
    """Every .png/.jpg file below folder, symlinked sub-folders followed; each real folder is read once, so a link
    loop ends and a folder linked twice is not counted twice."""
    found, seen = [], set()
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [Path(directory) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def find_images(path):
    """Images for label-free inference: one file, or every .png/.jpg below a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image or folder")
    images = image_files(path)
    if not images:
        raise DataError(f"{path}: no .png/.jpg images found")
    return images


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label) pairs, or bare images when a sample's label is None; `info` says what the classes are.

    An item is an index, or (index, seed) for random transforms: the seed makes augmentation a function of the
    sample's place in the run rather than of the worker process, which is what makes resume exact."""

    def __init__(self, samples, info, transform=None):
        self.samples, self.info, self.transform = samples, info, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = read_label(label_path, self.info) if label_path is not None else None
        if label is not None and label.shape != image.shape[:2]:
            raise DataError(f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image {image_path} is {image.shape[1]}x{image.shape[0]}")
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng(seed))
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "name": str(image_path)}
        if label is not None:
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return sample


# -- Layouts --------------------------------------------------------------------------------------------------
def folder_layout(root):
    """Which of the generic layouts ROOT holds: 'list', 'mmseg' or 'camvid' (None: none of them)."""
    root = Path(root)
    if (root / "train.txt").is_file() and "," in (root / "train.txt").read_text().split("\n", 1)[0]:
        return "list"
    if (root / "img_dir").is_dir():
        return "mmseg"
    if (root / "trainannot").is_dir() or (root / "valannot").is_dir():
        return "camvid"
    return None


def folder_info(root):
    """ROOT/classes.txt, or the shipped CamVid classes for a CamVid root without one."""
    root = Path(root)
    if (root / "classes.txt").is_file():
        return read_classes(root / "classes.txt", root.name)
    if folder_layout(root) == "camvid":
        return CAMVID
    raise DataError(f"{root / 'classes.txt'}: missing; write one class per line in index order, `name R G B` (see python datasets.py -h)")


def pair_by_stem(images_dir, labels_dir, label_name):
    """(image, label) for every image below images_dir, the label at the same relative path in labels_dir."""
    images = image_files(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no .png/.jpg images")
    samples = []
    for image in images:
        label = labels_dir / image.relative_to(images_dir).parent / label_name(image)
        if not label.is_file():
            raise DataError(f"{label}: missing label for {image}")
        samples.append((image, label))
    return samples


def folder_samples(root, split, with_labels=True):
    """(image_path, label_path | None) of a split in one of the generic layouts."""
    root = Path(root)
    layout = folder_layout(root)
    if layout == "list":
        list_file = root / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: split '{split}' not found; expected one `image_path,label_path` per line")
        samples, seen = [], {}
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if split != "train" and line.strip() in seen:  # training may repeat a line to sample it more often
                raise DataError(f"{list_file} line {number} repeats line {seen[line.strip()]}: an image scored twice counts twice; remove the repeat")
            seen.setdefault(line.strip(), number)
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2:
                raise DataError(f"{list_file} line {number}: expected `image_path,label_path`, got {line!r}")
            image, label = (root / p for p in parts)  # an absolute path stays absolute
            for path in (image, label):
                if not path.is_file():
                    raise DataError(f"{path}: listed in {list_file} line {number} but missing")
            samples.append((image, label if with_labels else None))
        if not samples:
            raise DataError(f"{list_file}: no samples")
        return samples
    if layout in ("mmseg", "camvid"):
        images_dir = root / "img_dir" / split if layout == "mmseg" else root / split
        labels_dir = root / "ann_dir" / split if layout == "mmseg" else root / f"{split}annot"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir}: split '{split}' not found")
        if not with_labels:
            return [(p, None) for p in image_files(images_dir)]
        return pair_by_stem(images_dir, labels_dir, lambda image: image.stem + ".png")
    raise DataError(
        f"{root}: no known layout; expected img_dir/ + ann_dir/ (mmseg), train.txt of `image,label` lines (CoinCheung), "
        "train/ + trainannot/ (CamVid), or leftImg8bit/ + gtFine/ (Cityscapes)"
    )


# -- Synthetic data in the generic layouts --------------------------------------------------------------------
def new_dataset_folder(out):
    """A synthesizer writes only into a new or empty folder: over a dataset it would mix its files with the user's."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; synthesize writes a new dataset: pass a new folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def synthetic_pair(rng, info, height, width):
    """An image of textured class regions (each class its own colour) and its label, 255 along some borders."""
    label = np.full((height, width), rng.integers(info.num_classes), dtype=np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        cls = int(rng.integers(info.num_classes))
        center = (int(rng.integers(width)), int(rng.integers(height)))
        axes = (int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3)))
        cv2.ellipse(label, center, axes, float(rng.uniform(0, 180)), 0, 360, cls, -1)
    edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    image = info.colors[label].astype(np.int16) + rng.integers(-25, 26, (height, width, 3))
    label[edges & (rng.random((height, width)) < 0.5)] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), label


def synthesize(out_dir, classes=7, train=12, val=4, test=0, height=128, width=256, layout="mmseg", seed=0):
    """A dataset of `classes` classes in a generic layout, classes.txt included; the same seed gives the same bytes.
    mmseg's layout gets palette PNG labels (as VOC-style tools write them), the others grey ones."""
    out = new_dataset_folder(out_dir)
    info = CAMVID if layout == "camvid" else DatasetInfo(out.name, tuple(f"class{k}" for k in range(classes)), tuple(voc_palette(classes)))
    if layout != "camvid":
        (out / "classes.txt").write_text("".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(info.class_names, info.palette)))
    for split_number, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        lines = []
        for i in range(count):
            rng = np.random.default_rng((seed, split_number, i))
            image, label = synthetic_pair(rng, info, height, width)
            if layout == "camvid":
                label[label == IGNORE_INDEX] = info.void_value
            image_rel, label_rel = {
                "mmseg": (f"img_dir/{split}/scene{i % 2}/{split}_{i:04d}.jpg", f"ann_dir/{split}/scene{i % 2}/{split}_{i:04d}.png"),
                "list": (f"images/{split}_{i:04d}.png", f"labels/{split}_{i:04d}.png"),
                "camvid": (f"{split}/{split}_{i:04d}.png", f"{split}annot/{split}_{i:04d}.png"),
            }[layout]
            for rel in (image_rel, label_rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / image_rel, quality=95) if image_rel.endswith(".jpg") else Image.fromarray(image).save(out / image_rel)
            png = Image.fromarray(label)
            if layout == "mmseg":
                png = png.convert("P")
                png.putpalette([c for color in voc_palette(256) for c in color])
            png.save(out / label_rel)
            lines.append(f"{image_rel},{label_rel}\n")
        if layout == "list" and count:
            (out / f"{split}.txt").write_text("".join(lines))
    return out


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthesize", help="write a synthetic dataset in a generic layout")
    synth.add_argument("out_dir")
    synth.add_argument("--classes", type=cli.integer(2, 255), default=7, help="class count (CamVid: always its 11)")
    synth.add_argument("--layout", default="mmseg", choices=LAYOUTS)
    synth.add_argument("--train", type=cli.integer(1), default=12)
    synth.add_argument("--val", type=cli.integer(0), default=4)
    synth.add_argument("--test", type=cli.integer(0), default=0)
    synth.add_argument("--height", type=cli.integer(32), default=128)
    synth.add_argument("--width", type=cli.integer(32), default=256)
    synth.add_argument("--seed", type=cli.integer(0), default=0)
    args = parser.parse_args(argv)
    try:
        synthesize(args.out_dir, args.classes, args.train, args.val, args.test, args.height, args.width, args.layout, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.train} train, {args.val} val, {args.test} test images ({args.layout} layout) to {args.out_dir}")


if __name__ == "__main__":
    main()
