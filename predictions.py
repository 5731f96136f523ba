"""Prediction files, written only with --out-dir (evaluate.py and tools/deploy.py import this then):
one PNG per image in the format asked, beside the input's own folder structure, never over a file
that is there and never among the inputs."""

import collections
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import cli
from cityscapes import sample_name
from cli import atomic_write
from datasets import IGNORE_INDEX, DataError


def prediction_writer(dataset, args, runtime):
    """write(sample, pred): the batch's predictions as PNGs at their paths (output_paths, checked
    before any image is segmented)."""
    out_paths = output_paths(dataset, args, runtime)

    def write(sample, pred):
        labels = sample["label"].numpy() if "label" in sample else [None] * len(sample["name"])
        images = sample["image"].permute(0, 2, 3, 1).numpy()
        for name, p, image, label in zip(sample["name"], pred.byte().cpu().numpy(), images, labels):
            encoded = encode_prediction(p, args.format, info=dataset.info, image=image, label=label)
            save_prediction(encoded, out_paths[name])

    return write


def output_paths(dataset, args, runtime):
    """{image: prediction PNG} in --out-dir, checked before any image is segmented."""
    one_image = bool(args.images) and Path(args.images).is_file()
    source_root = Path(args.images).parent if one_image else args.images or args.data_root
    out_paths = prediction_paths(
        [image for image, _ in dataset.samples], source_root, out_dir=args.out_dir, fmt=args.format
    )
    # this rank's shard: the others may be writing theirs
    mine = dict(list(out_paths.items())[runtime.rank :: runtime.world_size])
    # predictions never go among the inputs, nor over a file this run did not create; the folder
    # must be writable first
    out = Path(args.out_dir).resolve()
    source = Path(source_root).resolve()
    if not one_image and (out == source or source in out.parents):
        raise cli.UsageError(
            f"--out-dir {args.out_dir} is inside the input folder {source_root}; "
            "pass a folder outside it (predictions never go among the inputs)"
        )
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cli.UsageError(
            f"--out-dir {args.out_dir}: cannot create it ({e.strerror or e}); "
            "pass a writable folder"
        ) from None
    if not os.access(args.out_dir, os.W_OK):
        raise cli.UsageError(f"--out-dir {args.out_dir}: not writable; pass a writable folder")
    existing = [path for path in mine.values() if path.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise cli.UsageError(
            f"--out-dir {args.out_dir}: {existing[0]} exists{more}; "
            "pass another --out-dir or remove them (they are never overwritten)"
        )
    return out_paths


def encode_prediction(pred, fmt, *, info, image=None, label=None):
    """pred: HxW class indices (uint8 numpy) -> PIL image in format `fmt`, the dataset's colours."""
    if fmt == "compare":
        return comparison(image, label, pred, info)
    if fmt == "trainIds":
        return Image.fromarray(pred)
    if fmt == "labelIds":
        return Image.fromarray(np.array(info.submission_ids, dtype=np.uint8)[pred])
    if fmt == "color":
        return Image.fromarray(info.colors[pred])
    return Image.fromarray((0.5 * image + 0.5 * info.colors[pred]).astype(np.uint8))


def comparison(image, label, pred, info):
    """image | ground truth | prediction (ignored pixels black) above a legend of their classes."""
    colors = np.vstack([info.colors, np.zeros((256 - info.num_classes, 3), np.uint8)])
    width = pred.shape[1]
    shown = sorted(
        (set(np.unique(label).tolist()) | set(np.unique(pred).tolist())) - {IGNORE_INDEX}
    )
    legend = Image.new("RGB", (3 * width, 20 * ((len(shown) + 3) // 4) + 4), "white")
    draw = ImageDraw.Draw(legend)
    for k, c in enumerate(shown):
        x, y = (k % 4) * (3 * width // 4) + 4, (k // 4) * 20 + 4
        fill = tuple(int(v) for v in colors[c])
        draw.rectangle([x, y, x + 12, y + 12], fill=fill, outline="black")
        draw.text((x + 18, y), info.class_names[c], fill="black")
    panels = np.hstack([image.astype(np.uint8), colors[label], colors[pred]])
    return Image.fromarray(np.vstack([panels, np.asarray(legend)]))


def prediction_paths(image_paths, source_root, *, out_dir, fmt):
    """{image: out_dir/<its folder below source_root>/<name>_<fmt>.png}. Where two images of one
    folder share a name (a.jpg and a.png), the extension stays in it; images outside source_root
    (absolute list entries) go to out_dir itself. Two images that would still share a file are an
    error, never one prediction over another."""
    source_root = Path(source_root).resolve()
    keys = {}
    for image in map(Path, image_paths):
        try:
            folder = image.resolve().parent.relative_to(source_root)
        except ValueError:
            folder = Path()
        keys[str(image)] = (folder, sample_name(image))
    counts = collections.Counter(keys.values())
    paths, owners = {}, {}
    for image, (folder, name) in keys.items():
        suffix = Path(image).suffix if counts[(folder, name)] > 1 else ""
        path = Path(out_dir) / folder / f"{name}{suffix}_{fmt}.png"
        if path in owners:
            raise DataError(
                f"{owners[path]} and {image} would both be written to {path}; "
                "give them different names"
            )
        paths[image], owners[path] = path, image
    return paths


def save_prediction(image, path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, replace=False, suffix=".tmp.png") as temp:
            image.save(temp, format="PNG")
    except FileExistsError:
        raise DataError(
            f"{path} appeared while this run was writing predictions; it was kept, not replaced: "
            "pass another --out-dir"
        ) from None
    except OSError as e:
        raise DataError(
            f"{path}: cannot write the prediction ({e.strerror or e}); "
            "pass a writable --out-dir with free space"
        ) from None
