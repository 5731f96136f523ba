"""Data from files on disk to batches, for every dataset: the description of its classes that
travels with every checkpoint (DatasetInfo), reading images and labels, the dataset and which one a
data root holds, the training augmentation, the sampler that makes resume exact, and the label
statistics. The file layouts: cityscapes.py (Cityscapes) and interop.py (your own data).

Labels hold class indices (0..C-1, 255 = ignore) as 8-bit grey, palette ("P") or 1-bit PNGs, as
VOC-style and mask tools write them; images and labels are turned by their own EXIF orientation
alike.
"""

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

from bisenet import IMAGENET_MEAN
from cli import DataError, atomic_write, first_line, process_map

# the label value every dataset ignores in the loss, the metric and the crop padding, as mmseg and
# CoinCheung do
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what OpenCV reads
EXIF_ORIENTATION = 0x0112

cv2.setNumThreads(0)  # parallelism comes from DataLoader workers, as in mmseg


def voc_palette(count):
    """PASCAL VOC's colour for class k (bits of k spread over R, G, B): distinct, and familiar
    from VOC tools."""
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
    """What a model's outputs mean: class names and colours in index order, a label value read as
    ignore (CamVid's void), and the ids the benchmark server wants per class (Cityscapes'
    labelIds)."""

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
        """(valid, index): which 8-bit label values are allowed, and the class (or ignore) each
        one means."""
        valid = np.zeros(256, dtype=bool)
        valid[: self.num_classes] = valid[IGNORE_INDEX] = True
        index = np.arange(256, dtype=np.uint8)
        if self.void_value is not None:
            valid[self.void_value], index[self.void_value] = True, IGNORE_INDEX
        return valid, index

    def to_dict(self):
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        ignore = values.pop(
            "ignore_index", IGNORE_INDEX
        )  # earlier checkpoints saved it, always 255
        if ignore != IGNORE_INDEX:
            raise ValueError(f"ignore index {ignore} is not {IGNORE_INDEX}")
        values["class_names"] = tuple(values["class_names"])
        values["palette"] = tuple(tuple(c) for c in values["palette"])
        if values.get("submission_ids") is not None:
            values["submission_ids"] = tuple(values["submission_ids"])
        return cls(**values)


def unnamed_classes(count):
    """The classes of a model that does not say what they are: numbered names, a palette of their
    number."""
    return DatasetInfo(
        "unnamed classes", tuple(f"class{k}" for k in range(count)), tuple(voc_palette(count))
    )


def first_difference(ours, theirs):
    """(k, ours[k], theirs[k]) where two class lists first differ (None past a list's end)."""
    k = next(k for k in range(max(len(ours), len(theirs))) if ours[k : k + 1] != theirs[k : k + 1])
    return k, (ours[k : k + 1] or [None])[0], (theirs[k : k + 1] or [None])[0]


# -- Reading images and labels ---------------------------------------------------------------------
def exif_orientation(file):
    """The EXIF orientation (1-8; 1: as stored) of an opened PIL image, from the header only
    (PIL's getexif would decode a whole PNG to look for it)."""
    data = file.info.get("exif")
    if not data:
        return 1
    exif = Image.Exif()
    exif.load(data)
    return exif.get(EXIF_ORIENTATION, 1)


def oriented(pixels, orientation):
    """The stored pixel grid as a viewer shows it: EXIF orientations 2-8 are mirrorings and
    quarter turns."""
    if orientation not in range(2, 9):
        return pixels
    grid = (
        pixels.swapaxes(0, 1) if orientation >= 5 else pixels
    )  # 5-8: a transpose, then a mirroring
    rows = -1 if orientation in (3, 4, 7, 8) else 1
    cols = -1 if orientation in (2, 3, 6, 7) else 1
    return np.ascontiguousarray(grid[::rows, ::cols])


def decode(data, flags):
    """OpenCV's decoding of a file's bytes. cv2.imread takes a str path, which it cannot open
    (and may crash on) for names that are not valid UTF-8; the bytes are read by Python, which
    takes any name."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None


def read_image(path):
    """RGB uint8 HxWx3, turned by its EXIF orientation as read_label turns labels. libjpeg-turbo
    (simplejpeg) decodes JPEGs strictly: one it cannot decode cleanly (cut short, a flipped bit)
    is refused, where OpenCV and PIL return it with a part grey or garbled and at most a warning
    that names no file. OpenCV decodes the rest."""
    image, orientation, data = None, 1, b""
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as file:
            is_jpeg, orientation = file.format == "JPEG", exif_orientation(file)
        image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True) if is_jpeg else None
    except (
        FileNotFoundError,
        IsADirectoryError,
        Image.UnidentifiedImageError,
        Image.DecompressionBombError,
    ):
        pass  # a file OpenCV may read and PIL does not (or not at this size): no EXIF either
    except (OSError, ValueError) as e:  # ValueError: libjpeg's, e.g. "Premature end of JPEG file"
        fix = "re-extract or re-download this file"
        raise DataError(
            f"{path}: the image cannot be decoded whole ({first_line(e)}); {fix}"
        ) from None
    if (
        image is None
        and (image := decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)) is not None
    ):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise DataError(f"{path}: unreadable image; re-extract or re-download this file")
    return oriented(image, orientation)


def read_label(path, info):
    """Class indices uint8 HxW (ignore = 255), from a grey, palette or 1-bit PNG, turned by its
    EXIF orientation as read_image turns images; values outside the dataset's are an error."""
    label, orientation, data = None, 1, b""
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as png:
            mode, orientation = png.mode, exif_orientation(png)
            # PIL keeps palette indices (OpenCV expands them to colours) and 1-bit
            # values as 0/1 (OpenCV: 0/255)
            label = np.array(png).astype(np.uint8) if mode in ("P", "1") else None
    except (OSError, Image.DecompressionBombError):
        pass
    label = decode(data, cv2.IMREAD_UNCHANGED) if label is None else label
    if label is None:
        raise DataError(f"{path}: unreadable label PNG; re-create or re-convert it")
    label = oriented(label, orientation)
    if label.ndim != 2 or label.dtype != np.uint8:
        what = "a label must be a single-channel 8-bit PNG of class indices (grey or palette)"
        what += ", not colours"
        raise DataError(f"{path}: {what}; {info.label_hint or 'convert it'}")
    valid, index = info.label_table()
    if not valid[label].all():
        bad = sorted(set(np.unique(label).tolist()) - set(np.flatnonzero(valid).tolist()))
        void = f", {info.void_value} (void)" if info.void_value is not None else ""
        allowed = f"0..{info.num_classes - 1}{void} or 255 = ignore"
        fix = info.label_hint or "fix the labels or classes.txt"
        raise DataError(
            f"{path}: label values {bad[:8]} are not classes of {info.name} ({allowed}); {fix}"
        )
    return index[label] if info.void_value is not None else label


def ignore_stop_signals(_worker_id=None):
    """Loader workers leave SIGTERM and SIGUSR1 to their script (train.py stops the run cleanly
    on them)."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label) pairs, or bare images when a sample's label is None; `info` says what the
    classes are.

    An item is an index, or (index, seed) for random transforms: the seed makes augmentation a
    function of the sample's place in the run rather than of the worker process, which is what
    makes resume exact."""

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
            sizes = f"label is {label.shape[1]}x{label.shape[0]}"
            raise DataError(
                f"{label_path}: {sizes} but image {image_path} is {image.shape[1]}x{image.shape[0]}"
            )
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        sample = {"image": image, "name": str(image_path)}
        if label is not None:
            sample["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return sample


# -- Training augmentation -------------------------------------------------------------------------
def nearest_indices(out_size, in_size, start, count):
    """Source indices of nearest-neighbour resizing in_size -> out_size, for output positions
    start..start+count."""
    positions = np.arange(start, start + count)
    return np.minimum(((positions + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)


def levels(image, alpha=1.0, beta=0.0):
    """uint8 clip(image * alpha + beta) truncated, as mmseg computes it in float32, through a
    256-entry table."""
    return cv2.LUT(
        image, np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    )


class TrainTransform:
    """mmseg's Cityscapes recipe: random rescale, random crop with cat_max_ratio, pad, flip,
    photometric distortion. A crop larger than the rescaled image is padded with ignore and, in the
    image, the mean colour: mmseg pads after its Normalize with 0, which is the mean (`fill`,
    rounded to uint8, since the model normalises inside).

    Only the crop is ever resampled: the label crop is read through nearest-neighbour indices and
    the image crop through an affine warp with the rescale's own pixel mapping, which equal the
    crops of fully resized images (to within 1 grey level of cv2.resize, which mmseg uses).
    Interpolation as in mmseg: bilinear, no antialias.
    """

    # mmseg's PhotoMetricDistortion
    brightness, contrast, hue = 32, (0.5, 1.5), 18
    saturation = (0.5, 1.5)

    def __init__(
        self,
        crop=(1024, 1024),
        scale_range=(0.5, 2.0),
        *,
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric=True,
        fill=IMAGENET_MEAN,
    ):
        self.crop, self.scale_range, self.cat_max_ratio = crop, scale_range, cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric
        self.fill = np.round(fill).astype(np.uint8)

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
        image_crop = cv2.warpAffine(
            image,
            to_source,
            (crop_w, crop_h),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
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
        """mmseg's PhotoMetricDistortion: every step rounds to uint8, hue in OpenCV's 0..180
        circle, as there."""

        if rng.random() < 0.5:
            image = levels(image, beta=rng.uniform(-self.brightness, self.brightness))
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            image = levels(image, alpha=rng.uniform(*self.contrast))
        change_saturation, change_hue = rng.random() < 0.5, rng.random() < 0.5
        if change_saturation or change_hue:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            if change_saturation:
                hsv[..., 1] = levels(
                    np.ascontiguousarray(hsv[..., 1]), alpha=rng.uniform(*self.saturation)
                )
            if change_hue:
                hsv[..., 0] = ((np.arange(256) + rng.integers(-self.hue, self.hue)) % 180).astype(
                    np.uint8
                )[hsv[..., 0]]
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first and rng.random() < 0.5:
            image = levels(image, alpha=rng.uniform(*self.contrast))
        return image


# -- Sampling: which images each iteration of each rank trains on ----------------------------------
class IterationSampler(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for iterations start..iters-1. Epoch e is a
    permutation seeded by (seed, e), of which iteration i of rank r takes its own slice
    (drop_last). Augmentation seeds are (seed, iteration, rank, slot): nothing depends on worker
    processes, so a resumed run sees exactly the samples an uninterrupted one would."""

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
            yield [
                (order[first + k], (self.seed, it, self.rank, k)) for k in range(self.batch_size)
            ]


def training_loader(dataset, *, batch_size, workers, seed, start, iters, runtime):
    """One pass over all iterations, so no persistent workers; its own generator keeps the loader
    off the dropout RNG."""
    rank, world_size = runtime.rank, runtime.world_size
    sampler = IterationSampler(
        len(dataset),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start=start,
        iters=iters,
    )
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
def label_pixels(job):
    """Pixels per label value (256 counts) of one (label path, DatasetInfo)."""
    return np.bincount(read_label(*job).ravel(), minlength=256)


def label_histogram(dataset, processes):
    """Pixels per label value (0..255) of the dataset's labels, read in `processes` processes."""
    jobs = [(label, dataset.info) for _, label in dataset.samples]
    counts = process_map(label_pixels, jobs, processes, f"the labels of {dataset.info.name}")
    return sum(counts, np.zeros(256, np.int64))


def training_label_counts(dataset, cache, *, source, processes, log):
    """Pixels per label value (0..255) of every training label, read in `processes` processes and
    kept in the file `cache` under a digest of the labels' contents (a label rewritten with its
    size and time kept is read again; a cache that does not parse is rebuilt). Labels that cannot
    train what the classes say are refused, classes that never occur warned about."""
    digest = hashlib.sha256()
    for _, label in dataset.samples:
        digest.update(hashlib.sha256(Path(label).read_bytes()).digest())
    key, counts = digest.hexdigest(), None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(cache.read_text())
        counts = np.array(saved["pixels"], dtype=np.int64) if saved["key"] == key else None
    if counts is None or counts.shape != (256,):
        started = time.perf_counter()
        counts = label_histogram(dataset, processes)
        with (
            contextlib.suppress(OSError),
            atomic_write(cache) as temp,
        ):  # only a cache: a full disk is said later
            temp.write_text(json.dumps({"key": key, "pixels": counts.tolist()}))
        took = f"{time.perf_counter() - started:.1f} s in {processes} processes"
        log(f"label histogram of {len(dataset)} labels: {took}, cached in {cache.name}")
    info = dataset.info
    if info.num_classes == 2 and not counts[1:IGNORE_INDEX].any() and counts[IGNORE_INDEX]:
        trap = "the training labels hold only 0 and 255, and 255 is the ignore value"
        fix = f"write it as 1 into a copy: python tools/map_labels.py {source} NEW_ROOT --map 255=1"
        never = f"so {info.class_names[1]!r} never occurs"
        raise DataError(f"{source}: {trap}, {never}; if 255 marks your foreground, {fix}")
    absent = [name for name, count in zip(info.class_names, counts) if count == 0]
    if absent:
        some = f"{len(absent)} of {info.num_classes} classes"
        check = f"check the class list and label values (python tools/check_dataset.py {source})"
        log(f"warning: {some} never occur in the training labels: {', '.join(absent)}; {check}")
    return counts
