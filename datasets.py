"""Data from files to batches, for every dataset: DatasetInfo (the classes, which travel with every
checkpoint), reading images and labels, the training augmentation, the sampler that makes resume
exact, and the label statistics. File layouts: cityscapes.py and interop.py (your own data).

Labels hold class indices (0..C-1, 255 = ignore) as 8-bit grey, palette ("P") or 1-bit PNGs, as
VOC-style and mask tools write them; images and labels are turned by their EXIF orientation."""

import contextlib
import dataclasses
import hashlib
import json
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image
from PIL.Image import DecompressionBombError, UnidentifiedImageError

from bisenet import IMAGENET_MEAN
from cli import DataError, atomic_write, first_line, process_map

IGNORE_INDEX = 255  # ignored by the loss, the metric and the crop padding, as mmseg and CoinCheung
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what OpenCV reads
EXIF_ORIENTATION = 0x0112

cv2.setNumThreads(0)  # parallelism comes from DataLoader workers, as in mmseg


def voc_palette(count):
    """PASCAL VOC's colours, distinct and familiar: bit 3i + c of k is bit 7 - i of channel c."""
    k = np.arange(count)[:, None]
    rgb = sum(((k >> (3 * i + np.arange(3))) & 1) << (7 - i) for i in range(8))
    return [tuple(color) for color in rgb.tolist()]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model's outputs mean: class names and colours in index order, a label value read as
    ignore (CamVid's void), the ids the benchmark server wants per class (Cityscapes' labelIds)."""

    name: str
    class_names: tuple
    palette: tuple
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
        """(valid, index): the 8-bit label values allowed, and the class (or ignore) each means."""
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes] = valid[IGNORE_INDEX] = True
        index = np.arange(256, dtype=np.uint8)
        if self.void_value is not None:
            valid[self.void_value], index[self.void_value] = True, IGNORE_INDEX
        return valid, index

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        # earlier checkpoints saved the ignore index, always 255
        if (ignore := values.pop("ignore_index", IGNORE_INDEX)) != IGNORE_INDEX:
            raise ValueError(f"ignore index {ignore} is not {IGNORE_INDEX}")
        values["class_names"] = tuple(values["class_names"])
        values["palette"] = tuple(tuple(c) for c in values["palette"])
        if values.get("submission_ids") is not None:
            values["submission_ids"] = tuple(values["submission_ids"])
        return cls(**values)


def unnamed_classes(count):
    """The classes of a model that does not say what they are: numbered, in VOC's colours."""
    names = tuple(f"class{k}" for k in range(count))
    return DatasetInfo("unnamed classes", names, tuple(voc_palette(count)))


def first_difference(ours, theirs):
    """(k, ours[k], theirs[k]) where two class lists first differ (None past a list's end)."""
    k = next(k for k in range(max(len(ours), len(theirs))) if ours[k : k + 1] != theirs[k : k + 1])
    return k, (ours[k : k + 1] or [None])[0], (theirs[k : k + 1] or [None])[0]


# -- Reading images and labels ---------------------------------------------------------------------
def exif_orientation(file):
    """A PIL image's EXIF orientation (1: as stored), from its header (getexif decodes a PNG)."""
    exif = Image.Exif()
    exif.load(file.info.get("exif") or b"")
    return exif.get(EXIF_ORIENTATION, 1)


def oriented(pixels, orientation):
    """The pixels as a viewer shows them: orientations 2-8 mirror them (5-8: transposed first)."""
    grid = pixels.swapaxes(0, 1) if orientation in (5, 6, 7, 8) else pixels
    rows = -1 if orientation in (3, 4, 7, 8) else 1
    cols = -1 if orientation in (2, 3, 6, 7) else 1
    return np.ascontiguousarray(grid[::rows, ::cols])


def decode(data, flags):
    """OpenCV's decoding of a file's bytes: cv2.imread cannot open (and may crash on) names that are
    not valid UTF-8, which Python reads."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None


def read_image(path):
    """RGB uint8 HxWx3, turned by its EXIF orientation. JPEGs decode strictly (simplejpeg): one cut
    short or with a flipped bit is refused, where OpenCV and PIL return it part grey or garbled
    with at most a warning that names no file. OpenCV decodes the rest."""
    image, orientation, data = None, 1, b""
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as file:
            is_jpeg, orientation = file.format == "JPEG", exif_orientation(file)
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True) if is_jpeg else None
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, DecompressionBombError):
        pass  # a file OpenCV may read and PIL does not (or not at this size): no EXIF either
    except (OSError, ValueError) as e:  # ValueError: libjpeg's, e.g. "Premature end of JPEG file"
        whole = f"the image cannot be decoded whole ({first_line(e)})"
        raise DataError(f"{path}: {whole}; re-extract or re-download this file") from None
    if image is None:
        image = decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise DataError(f"{path}: unreadable image; re-extract or re-download this file")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return oriented(image, orientation)


def read_label(path, info):
    """Class indices uint8 HxW (ignore = 255), from a grey, palette or 1-bit PNG, turned by its
    EXIF orientation as read_image turns images; values outside the dataset's are an error."""
    label, orientation, data = None, 1, b""
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as png:
            mode, orientation = png.mode, exif_orientation(png)
            # PIL keeps palette indices (OpenCV: colours) and 1-bit values as 0/1 (OpenCV: 255)
            label = np.array(png).astype(np.uint8) if mode in ("P", "1") else None
    except (OSError, DecompressionBombError):
        pass
    label = decode(data, cv2.IMREAD_UNCHANGED) if label is None else label
    if label is None:
        raise DataError(f"{path}: unreadable label PNG; re-create or re-convert it")
    label = oriented(label, orientation)
    if label.ndim != 2 or label.dtype != np.uint8:
        what = "a label must be a single-channel 8-bit PNG of class indices (grey or palette)"
        raise DataError(f"{path}: {what}, not colours; {info.label_hint or 'convert it'}")
    valid, index = info.label_table()
    if not valid[label].all():
        bad = np.unique(label[~valid[label]]).tolist()
        void = f", {info.void_value} (void)" if info.void_value is not None else ""
        allowed = f"0..{info.num_classes - 1}{void} or 255 = ignore"
        fix = info.label_hint or "fix the labels or classes.txt"
        not_classes = f"label values {bad[:8]} are not classes of {info.name}"
        raise DataError(f"{path}: {not_classes} ({allowed}); {fix}")
    return index[label] if info.void_value is not None else label


def ignore_stop_signals(_worker_id=None):
    """Loader workers leave SIGTERM and SIGUSR1 to their script (train.py stops cleanly on them)."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label) pairs, or bare images where a label is None; `info`: the classes. An item is
    an index, or (index, seed) for random transforms: augmentation follows the sample's place in
    the run, not the worker process, which makes resume exact."""

    def __init__(self, samples, info, *, transform=None):
        self.samples, self.info, self.transform = samples, info, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = read_label(label_path, self.info) if label_path is not None else None
        if label is not None and label.shape != image.shape[:2]:
            sizes = f"label is {label.shape[1]}x{label.shape[0]} but image {image_path} is"
            raise DataError(f"{label_path}: {sizes} {image.shape[1]}x{image.shape[0]}")
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sample = {"image": image, "name": str(image_path)}
        if label is not None:
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return sample


# -- Training augmentation -------------------------------------------------------------------------
def nearest_indices(out_size, in_size, start, count):
    """Nearest-neighbour resizing in_size -> out_size: source indices of outputs start..+count."""
    positions = np.arange(start, start + count)
    return np.minimum(((positions + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def levels(image, alpha=1.0, beta=0.0):
    """uint8 clip(image * alpha + beta), truncated as mmseg's float32, through a 256-entry table."""
    table = np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def balanced(label, max_ratio):
    """More than one class, none covering max_ratio of the labelled pixels (mmseg's check)."""
    counts = np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX]
    return np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < max_ratio


@dataclasses.dataclass(eq=False)
class TrainTransform:
    """mmseg's Cityscapes recipe: random rescale, random crop with cat_max_ratio, pad, flip,
    photometric distortion. Padding: ignore, and the mean colour (`fill`): mmseg pads with 0 after
    its Normalize, and the model normalises inside. Only the crop is resampled: the label's through
    nearest-neighbour indices, the image's by an affine warp with the rescale's pixel mapping, equal
    to crops of the resized images (within 1 grey level of mmseg's cv2.resize: bilinear, no
    antialias)."""

    crop: tuple = (1024, 1024)
    scale_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    fill = np.round(IMAGENET_MEAN).astype(np.uint8)
    brightness, contrast, hue = 32, (0.5, 1.5), 18  # mmseg's PhotoMetricDistortion
    saturation = (0.5, 1.5)

    def __call__(self, image, label, rng):
        height, width = label.shape
        ratio = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
        crop_h, crop_w = min(self.crop[0], scaled_h), min(self.crop[1], scaled_w)
        # cat_max_ratio: up to 10 more crops while one class fills too much of the crop, as mmseg
        for _ in range(11):
            top, left = rng.integers(scaled_h - crop_h + 1), rng.integers(scaled_w - crop_w + 1)
            rows = nearest_indices(scaled_h, height, top, crop_h)
            cols = nearest_indices(scaled_w, width, left, crop_w)
            label_crop = label[rows[:, None], cols[None, :]]
            if self.cat_max_ratio >= 1 or balanced(label_crop, self.cat_max_ratio):
                break
        sy, sx = height / scaled_h, width / scaled_w
        to_source = np.array([[sx, 0, (left + 0.5) * sx - 0.5], [0, sy, (top + 0.5) * sy - 0.5]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        image_crop = cv2.warpAffine(
            image, to_source, (crop_w, crop_h), flags=flags, borderMode=cv2.BORDER_REPLICATE
        )
        if rng.random() < self.flip_prob:
            image_crop, label_crop = image_crop[:, ::-1], label_crop[:, ::-1]
        if self.photometric:
            image_crop = self.distort(np.ascontiguousarray(image_crop), rng)
        out_image = np.broadcast_to(self.fill, (*self.crop, 3)).copy()
        out_label = np.full(self.crop, IGNORE_INDEX, dtype=np.uint8)
        out_image[:crop_h, :crop_w] = image_crop
        out_label[:crop_h, :crop_w] = label_crop
        return out_image, out_label

    def distort(self, image, rng):
        """mmseg's PhotoMetricDistortion: each step rounds to uint8; hue on OpenCV's 0..180."""
        if rng.random() < 0.5:
            image = levels(image, beta=rng.uniform(-self.brightness, self.brightness))
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            image = levels(image, alpha=rng.uniform(*self.contrast))
        change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
        if change_saturation or change_hue:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            if change_saturation:
                saturation = np.ascontiguousarray(hsv[..., 1])
                hsv[..., 1] = levels(saturation, alpha=rng.uniform(*self.saturation))
            if change_hue:
                hue = (np.arange(256) + rng.integers(-self.hue, self.hue)) % 180
                hsv[..., 0] = hue.astype(np.uint8)[hsv[..., 0]]
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and rng.random() < 0.5:
            image = levels(image, alpha=rng.uniform(*self.contrast))
        return image


# -- Sampling: which images each iteration of each rank trains on ----------------------------------
class IterationSampler(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for iterations start..iters-1: epoch e is a permutation
    seeded by (seed, e), sliced per iteration and rank (drop_last); seeds are (seed, iteration,
    rank, slot), never the worker's, so a resumed run sees exactly what an unbroken one would."""

    def __init__(self, size, *, batch_size, rank, world_size, seed, start, iters):
        self.per_epoch = size // (batch_size * world_size)
        if self.per_epoch == 0:
            batch = f"one batch of {batch_size} x {world_size} devices"
            raise DataError(f"{size} training images cannot fill {batch}; lower --batch-size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start, self.iters = start, iters

    def __iter__(self):
        epoch, order = None, None
        for it in range(self.start, self.iters):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                order = torch.randperm(self.size, generator=generator).tolist()
            first = ((it % self.per_epoch) * self.world_size + self.rank) * self.batch_size
            slots = range(self.batch_size)
            yield [(order[first + k], (self.seed, it, self.rank, k)) for k in slots]


def training_loader(dataset, *, workers, runtime, **plan):
    """One pass over all iterations (`plan`: IterationSampler's batch_size, seed, start and iters),
    so no persistent workers; its own generator keeps the loader off the dropout RNG."""
    rank, world_size = runtime.rank, runtime.world_size
    sampler = IterationSampler(len(dataset), rank=rank, world_size=world_size, **plan)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator(),
        pin_memory=runtime.pin_memory,
        pin_memory_device=runtime.pin_memory_device,
    )


# -- Label statistics: what the labels hold, before a run trains on them ---------------------------
ONLY_0_AND_255 = "labels hold only 0 and 255, and 255 is the ignore value"
FOREGROUND_FIX = "if 255 marks your foreground, write it as 1"


def only_0_and_255(info, counts):
    """Two classes, labels (pixels per value) of 0 and 255: a model would learn background alone."""
    return info.num_classes == 2 and not counts[1:IGNORE_INDEX].any() and counts[IGNORE_INDEX] > 0


def never_occur(info, counts, where=""):
    """The classes without a pixel in `counts` (per label value), and the warning ('' if none)."""
    absent = [name for name, count in zip(info.class_names, counts) if count == 0]
    some = f"{len(absent)} of {info.num_classes} classes never occur{where}"
    return absent, f"{some}: {', '.join(absent)}" if absent else ""


def label_pixels(job):
    """Pixels per label value (256 counts) of one (label path, DatasetInfo)."""
    return np.bincount(read_label(*job).ravel(), minlength=256)


def label_histogram(dataset, processes):
    """Pixels per label value (0..255) of the dataset's labels, read in `processes` processes."""
    jobs = [(label, dataset.info) for _, label in dataset.samples]
    counts = process_map(label_pixels, jobs, processes, f"the labels of {dataset.info.name}")
    return sum(counts, np.zeros(256, np.int64))


def training_label_counts(dataset, cache, *, source, processes, log):
    """Pixels per label value (0..255) of every training label, cached in the file `cache` under a
    digest of the labels' contents (a label rewritten with its size and time kept is read again; a
    cache that does not parse is rebuilt). Refuses labels that cannot train the classes, warns of
    classes that never occur."""
    digests = (hashlib.sha256(Path(label).read_bytes()).digest() for _, label in dataset.samples)
    key, counts = hashlib.sha256(b"".join(digests)).hexdigest(), None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(cache.read_text())
        counts = np.array(saved["pixels"], dtype=np.int64) if saved["key"] == key else None
    if counts is None or counts.shape != (256,):
        started = time.perf_counter()
        counts = label_histogram(dataset, processes)
        # only a cache: a full disk is said later
        with contextlib.suppress(OSError), atomic_write(cache) as temp:
            temp.write_text(json.dumps({"key": key, "pixels": counts.tolist()}))
        took = f"{time.perf_counter() - started:.1f} s in {processes} processes"
        log(f"label histogram of {len(dataset)} labels: {took}, cached in {cache.name}")
    info = dataset.info
    if only_0_and_255(info, counts):
        never = f"so {info.class_names[1]!r} never occurs"
        command = f"python tools/map_labels.py {source} NEW_ROOT --map 255=1"
        fix = f"{FOREGROUND_FIX} into a copy: {command}"
        raise DataError(f"{source}: the training {ONLY_0_AND_255}, {never}; {fix}")
    if warning := never_occur(info, counts, " in the training labels")[1]:
        check = f"check the class list and label values (python tools/check_dataset.py {source})"
        log(f"warning: {warning}; {check}")
    return counts
