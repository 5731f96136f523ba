"""Check a dataset before training on it: what train.py and evaluate.py will read, per split.

    python tools/check_dataset.py data/cityscapes      # Cityscapes, or your own data in any layout
    python tools/check_dataset.py data/mydata --out reports/mydata --samples 6

Per split: image count and sizes, the label values found, pixels per class (a table, and
class_pixels.png), the classes that never occur, and for train the images' RGB mean/std.
samples_SPLIT.png shows a few images with their labels overlaid, beside the same samples after the
training augmentation (what the model sees). A file that cannot be read, or a label of another
size than its image, is named, and the check goes on; it then exits with 1. The last line printed
is JSON.
"""

import collections
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from cityscapes import detect_dataset, open_dataset
from datasets import (
    FOREGROUND_FIX,
    IGNORE_INDEX,
    ONLY_0_AND_255,
    TrainTransform,
    never_occur,
    only_0_and_255,
    read_image,
    read_label,
)
from plot_run import pyplot, save_figure


def shown(path):
    """A path as text that any output takes: bytes of a name that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def sample_statistics(job):
    """(image size, RGB sums and squared sums, label value counts) of one (image, label) pair, or
    the line that says what is wrong with it."""
    image_path, label_path, info = job
    try:
        image = read_image(image_path).astype(np.float64)
        label = read_label(label_path, info) if label_path else None
    except cli.DataError as e:
        return f"{e}"
    except Exception as e:  # noqa: BLE001  (a finding about this pair, never the end of the check)
        pair = f"{image_path}" + (f" / {label_path}" if label_path else "")
        return f"{pair}: cannot be read ({type(e).__name__}: {cli.first_line(e)})"
    if label is not None and label.shape != image.shape[:2]:
        sizes = f"label is {label.shape[1]}x{label.shape[0]} but image {image_path} is"
        return (
            f"{label_path}: {sizes} {image.shape[1]}x{image.shape[0]}; a label must have its "
            "image's size: re-export the one that is wrong"
        )
    values = np.bincount(label.ravel(), minlength=256) if label is not None else np.zeros(256)
    pixels = image.reshape(-1, 3)
    return image.shape[:2], pixels.sum(0), (pixels**2).sum(0), values.astype(np.int64)


def read_all(function, jobs, nproc, what):
    """[function(job) for job in jobs], in nproc processes (cli.process_map: a process that dies
    ends the check with one line)."""
    return list(cli.process_map(function, jobs, nproc, what))


def split_statistics(dataset, what, *, nproc):
    """The split's counts, sizes, label values and RGB moments; what is wrong as error lines, and
    the indices of the good samples."""
    jobs = [(image, label, dataset.info) for image, label in dataset.samples]
    results = read_all(sample_statistics, jobs, nproc, what)
    good = [r for r in results if not isinstance(r, str)]
    values = sum((r[3] for r in good), np.zeros(256, np.int64))
    pixels = sum(r[0][0] * r[0][1] for r in good)
    mean = sum((r[1] for r in good), np.zeros(3)) / max(pixels, 1)
    std = np.sqrt(np.maximum(sum((r[2] for r in good), np.zeros(3)) / max(pixels, 1) - mean**2, 0))
    sizes = collections.Counter(f"{h}x{w}" for (h, w), *_ in good)
    return {
        "images": len(jobs),
        "sizes": dict(sizes),
        "values": values,
        "mean": mean,
        "std": std,
        "errors": [r for r in results if isinstance(r, str)],
        "good": [k for k, r in enumerate(results) if not isinstance(r, str)],
    }


def report(split, stats, info):
    """Prints the split's table; returns its JSON part."""
    counts = stats["values"][: info.num_classes]
    labelled = int(counts.sum())
    absent, never = never_occur(info, counts)
    found = np.flatnonzero(stats["values"]).tolist()
    print(f"{split}: {stats['images']} images, sizes {stats['sizes']}, label values {found}")
    print(f"{'class':>20} | {'pixels':>12} | share of labelled")
    for name, count in zip(info.class_names, counts):
        print(f"{name:>20} | {int(count):>12} | {100 * count / max(labelled, 1):6.2f}%")
    print(f"{'ignored (255)':>20} | {int(stats['values'][IGNORE_INDEX]):>12} |")
    if absent and stats["values"].any():
        print(f"warning: {split}: {never}", file=sys.stderr)
    if only_0_and_255(info, stats["values"]):
        fix = f"{FOREGROUND_FIX} (tools/map_labels.py)"
        print(f"warning: {split}: {ONLY_0_AND_255}: {fix}", file=sys.stderr)
    part = {
        "images": stats["images"],
        "sizes": stats["sizes"],
        "pixels": dict(zip(info.class_names, map(int, counts))),
        "absent": absent,
    }
    return part | {"ignored_pixels": int(stats["values"][IGNORE_INDEX]), "broken": stats["errors"]}


def overlay(image, label, info):
    colors = np.vstack([info.colors, np.zeros((256 - info.num_classes, 3), np.uint8)])
    shown = 0.5 * image + 0.5 * colors[label]
    return np.where((label == IGNORE_INDEX)[..., None], image, shown).astype(np.uint8)


def plot_class_pixels(parts, info, out):
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * info.num_classes), 4))
    width = 0.8 / max(len(parts), 1)
    for k, (split, part) in enumerate(parts.items()):
        axis.bar(
            np.arange(info.num_classes) + k * width,
            [part["pixels"][name] for name in info.class_names],
            width,
            label=split,
        )
    axis.set_xticks(
        np.arange(info.num_classes) + 0.4 - width / 2, info.class_names, rotation=60, ha="right"
    )
    axis.set_yscale("symlog")
    axis.set_ylabel("pixels")
    axis.set_title(f"{info.name}: pixels per class")
    axis.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, never over them
    save_figure(plt, figure, out / "class_pixels.png")


def plot_samples(dataset, split, out, *, good, count, crop):
    """Rows: image with its label overlaid | the same after the training augmentation, of the first
    `count` labelled samples among `good` (indices of samples that were read whole)."""
    plt = pyplot()
    chosen = [(i, dataset.samples[i]) for i in good if dataset.samples[i][1] is not None][:count]
    if not chosen:
        return
    figure, axes = plt.subplots(len(chosen), 2, figsize=(10, 2.8 * len(chosen)), squeeze=False)
    for row, (index, (image_path, label_path)) in enumerate(chosen):
        image, label = read_image(image_path), read_label(label_path, dataset.info)
        seen, seen_label = TrainTransform(crop or image.shape[:2])(
            image, label, np.random.default_rng(index)
        )
        for axis, picture, title in (
            (axes[row, 0], overlay(image, label, dataset.info), shown(Path(image_path).name)),
            (axes[row, 1], overlay(seen, seen_label, dataset.info), "training augmentation"),
        ):
            axis.imshow(picture)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    save_figure(plt, figure, out / f"samples_{split}.png")


def check(args):
    root, out = (
        Path(args.data_root),
        Path(args.out or f"work_dirs/check_{Path(args.data_root).resolve().name}"),
    )
    out.mkdir(parents=True, exist_ok=True)
    parts, info, moments = {}, None, None
    print(f"dataset: {detect_dataset(root, args.dataset)} at {shown(root)}")
    for split in ("train", "val"):
        try:
            dataset = open_dataset(root, split, dataset_type=args.dataset)
        except cli.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        info = dataset.info
        stats = split_statistics(dataset, f"the {split} files of {root}", nproc=args.nproc)
        for error in stats["errors"]:
            print(f"error: {error}", file=sys.stderr)
        parts[split] = report(split, stats, info)
        moments = moments or (split == "train" and stats)
        if args.samples:
            plot_samples(
                dataset, split, out, good=stats["good"], count=args.samples, crop=args.crop
            )
    if info is None:
        raise cli.DataError(f"{root}: neither a train nor a val split could be opened")
    plot_class_pixels(parts, info, out)
    summary = {
        "dataset": info.name,
        "classes": list(info.class_names),
        "splits": parts,
        "out": str(out),
    }
    if moments:
        summary |= {
            "rgb_mean": [round(float(v), 2) for v in moments["mean"]],
            "rgb_std": [round(float(v), 2) for v in moments["std"]],
        }
        print(f"train RGB mean {summary['rgb_mean']}, std {summary['rgb_std']} (0..255)")
    print(json.dumps(summary))
    if any(part["broken"] for part in parts.values()) or len(parts) < 2:
        sys.exit(1)


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("data_root")
    parser.add_argument("--dataset", default="auto", choices=cli.DATASET_TYPES)
    parser.add_argument("--out", help="where the PNGs go (default: work_dirs/check_<root name>)")
    parser.add_argument(
        "--samples", type=cli.integer(0), default=4, help="images per split in samples_SPLIT.png"
    )
    parser.add_argument(
        "--crop",
        type=cli.size,
        help="the augmentation's crop, as train.py --crop (default: each image's size)",
    )
    parser.add_argument(
        "--nproc", type=cli.integer(1), default=2, help="processes reading the files"
    )
    cli.main(check, parser.parse_args(argv))


if __name__ == "__main__":
    main()
