"""Evaluate a BiSeNetV1 checkpoint on Cityscapes or your own data, or write its predictions.

    python evaluate.py --ckpt work_dirs/r18/latest.pth --data-root data/cityscapes    # ss whole
    python evaluate.py --ckpt model.pth --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip    # ms+flip
    python evaluate.py --ckpt model.pth --split test --out-dir preds --format labelIds  # server
    python evaluate.py --ckpt model.pth --images photos/ --out-dir out --format overlay  # images

Exported models, video and inference speed: tools/deploy.py and tools/benchmark_inference.py.

IoU = tp / (tp + fp + fn) per class over pixels whose ground truth is not 255, as cityscapesscripts
computes it; a class with tp + fp + fn = 0 is left out of the mean. The last line printed is JSON.
"""

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from bisenet import fuse_bn, upsampled_classes
from checkpoints import load_model
from cityscapes import detect_dataset, open_dataset
from datasets import (
    IGNORE_INDEX,
    DataError,
    SegmentationDataset,
    first_difference,
    ignore_stop_signals,
    unnamed_classes,
)
from device import setup_runtime, teardown_runtime

PER_CLASS = ("iou", "dice", "precision", "recall")
resize = functools.partial(F.interpolate, mode="bilinear", align_corners=False)


@dataclasses.dataclass(frozen=True)
class Inference:
    """How class scores are computed: scales, horizontal flip, whole image or sliding window."""

    scales: tuple = (1.0,)
    flip: bool = False
    mode: str = "whole"
    crop: tuple = (1024, 1024)  # slide window
    stride: tuple = (768, 768)  # slide stride

    @classmethod
    def from_args(cls, args):
        return cls(args.scales, args.flip, args.mode, args.crop, args.stride)

    @property
    def single_pass(self):
        return tuple(self.scales) == (1.0,) and not self.flip and self.mode == "whole"

    @property
    def name(self):
        """E.g. 'ss whole' or 'ms+flip slide 1024/768', printed with every number."""
        name = "ms" if tuple(self.scales) != (1.0,) else "ss"
        name = {"ss": "flip", "ms": "ms+flip"}[name] if self.flip else name
        if self.mode == "whole":
            return f"{name} whole"
        (ch, cw), (sh, sw) = self.crop, self.stride
        window = f"{ch}/{sh}" if ch == cw and sh == sw else f"{ch}x{cw}/{sh}x{sw}"
        return f"{name} slide {window}"


def slide_logits(model, images, options):
    """mmseg's sliding window: windows clamped inside the image, overlapping logits averaged."""
    (_, _, height, width), stride = images.shape, options.stride
    crop_h, crop_w = min(options.crop[0], height), min(options.crop[1], width)
    rows = max(height - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_w + stride[1] - 1, 0) // stride[1] + 1
    total, count = None, images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride[0], height - crop_h), min(c * stride[1], width - crop_w)
            logits = model(images[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w]).float()
            if total is None:  # the class count comes from the logits
                total = logits.new_zeros((images.shape[0], logits.shape[1], height, width))
            total[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w] += logits
            count[:, :, y1 : y1 + crop_h, x1 : x1 + crop_w] += 1
    return total / count


def predict(model, images, *, options=Inference()):
    """Class scores at input size: logits for one pass, else softmax averaged over scales/flips."""
    height, width = images.shape[2:]
    passes = [(s, f) for s in options.scales for f in ((False, True) if options.flip else (False,))]
    total = None
    for scale, flipped in passes:
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        x = resize(images.float(), size=size) if scale != 1.0 else images
        x = x.flip(3) if flipped else x
        scores = model(x).float() if options.mode == "whole" else slide_logits(model, x, options)
        if len(passes) == 1:
            return scores
        scores = scores.softmax(1)
        scores = scores.flip(3) if flipped else scores
        scores = resize(scores, size=(height, width)) if scale != 1.0 else scores
        total = scores if total is None else total + scores
    return total / len(passes)


def predict_classes(model, images, *, options=Inference()):
    """The class map. A single whole-image pass never materialises full-size logits."""
    if options.single_pass:
        return upsampled_classes(model(images, upsample=False), images.shape[2:])
    # max(1).indices: argmax's first maximum, several times faster on CPU
    return predict(model, images, options=options).max(1).indices


def confusion_matrix(pred, label, num_classes):
    """rows = ground truth, columns = prediction; pixels labelled 255 are ignored. They are counted
    in one extra bin, so shapes never depend on the data (and an image without labels is fine)."""
    label = label.long()
    index = torch.where(label != IGNORE_INDEX, label * num_classes + pred.long(), num_classes**2)
    counts = torch.bincount(index.flatten(), minlength=num_classes**2 + 1)
    return counts[: num_classes**2].view(num_classes, num_classes)


def metrics(confusion):
    """Per-class IoU, Dice (F1), precision and recall (Acc) of one confusion matrix. A ratio whose
    pixels are all absent (a class neither labelled nor predicted; precision of a class never
    predicted, recall of one never labelled) is NaN, left out of its mean."""
    confusion = confusion.double()
    tp, labelled, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)

    def ratio(part, whole):
        return torch.where(whole > 0, part / whole.clamp(min=1), torch.nan)

    per_class = {
        "iou": ratio(tp, labelled + predicted - tp),
        "dice": ratio(2 * tp, labelled + predicted),
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, labelled),
    }
    means = {"mIoU": "iou", "mAcc": "recall", "mDice": "dice"}
    result = {name: 100 * per_class[key].nanmean().item() for name, key in means.items()}
    result |= {k: v.tolist() for k, v in per_class.items()}
    result["aAcc"] = 100 * (tp.sum() / confusion.sum().clamp(min=1)).item()
    result["classes_in_mean"] = int((labelled + predicted > 0).sum())
    return result


def torch_segmenter(model, runtime, *, amp="O0", options=Inference()):
    """images -> class map through a PyTorch model in eval mode (evaluate(), tools/video.py)."""

    def segment(images):
        with torch.no_grad(), runtime.autocast(amp):
            return predict_classes(model, images, options=options)

    return segment


@torch.no_grad()
def evaluate(segment, dataset, *, runtime, write=None, workers=2):
    """Metrics over the dataset (all ranks together; none for label-free data) and this rank's
    seconds: waiting for data (decoding, copies), in the model (prediction and confusion matrix,
    synchronised) and in all. segment: images -> class map (torch_segmenter, or a deployed model of
    tools/deploy.py). The classes are the dataset's (dataset.info), which must be the model's.
    write(sample, pred): writes the predictions (predictions.prediction_writer)."""
    # no padding: each image counts once
    shard = torch.utils.data.Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
    loading = dict(worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    loading |= dict(pin_memory=runtime.pin_memory, pin_memory_device=runtime.pin_memory_device)
    loader = torch.utils.data.DataLoader(shard, num_workers=workers, **loading)
    classes, metric_device = dataset.info.num_classes, runtime.metric_device
    confusion = torch.zeros(classes, classes, dtype=torch.int64, device=metric_device)
    has_labels, data_s, model_s = True, 0.0, 0.0
    started = tick = time.perf_counter()
    for sample in tqdm(loader, desc="evaluate", disable=not runtime.is_main, leave=False):
        data_s += time.perf_counter() - tick
        tick = time.perf_counter()
        pred = segment(sample["image"].to(runtime.device, non_blocking=True))
        if "label" in sample:
            label = sample["label"].to(metric_device, non_blocking=True)
            confusion += confusion_matrix(pred.to(metric_device), label, classes)
        else:
            has_labels = False
        runtime.synchronize()
        model_s += time.perf_counter() - tick
        if write:
            write(sample, pred)
        tick = time.perf_counter()
    seconds = {"data_s": data_s, "model_s": model_s, "eval_s": time.perf_counter() - started}
    seconds = {key: round(value, 3) for key, value in seconds.items()}
    if not has_labels:
        return seconds
    confusion = runtime.all_reduce_counts(confusion).cpu()
    return {**metrics(confusion), "confusion": confusion.tolist(), **seconds}


def print_table(result, mode, *, class_names):
    print(f"{'class':>15} | {'IoU':>6} | {'Dice':>6} | {'Prec.':>6} | {'Recall':>6}   ({mode})")
    for name, *values in zip(class_names, *(result[key] for key in PER_CLASS)):
        cells = ["   n/a" if np.isnan(v) else f"{100 * v:6.2f}" for v in values]
        print(f"{name:>15} | " + " | ".join(cells))
    count, total = result["classes_in_mean"], len(class_names)
    over = f" over {count} of {total} classes" if count < total else ""
    means = "    ".join(f"{key} {result[key]:.2f}" for key in ("mDice", "mAcc", "aAcc"))
    print(f"{'mIoU':>15} | {result['mIoU']:6.2f}{over}    {means}")


# -- The script ------------------------------------------------------------------------------------
def inference_model(model, runtime):
    """As deployed: BatchNorm folded into convolutions, the device's preferred memory format."""
    return fuse_bn(model).to(runtime.device, memory_format=runtime.memory_format)


def evaluation_parser(description):
    """The flags of scoring a model and writing its predictions; tools/deploy.py adds its own."""
    parser = cli.ArgumentParser(description)
    parser.add_argument("--ckpt", help="our checkpoint, CoinCheung's or mmseg's released weights")
    cli.add_data_flags(parser)
    cli.add_device_flags(parser)
    group = parser.add_argument_group("what to score or segment")
    group.add_argument("--split", default="val")
    group.add_argument("--images", help="an image or image folder to segment (no labels, any size)")
    group.add_argument("--out-dir", help="write one PNG per image here")
    group.add_argument(
        "--format",
        default="color",
        choices=("color", "labelIds", "trainIds", "overlay", "compare"),
        help="labelIds: Cityscapes' submission ids; compare: image | truth | prediction",
    )
    group.add_argument("--workers", type=cli.integer(0), default=2)
    group = parser.add_argument_group("inference")
    group.add_argument("--scales", type=cli.ratios(), default="1.0", help="e.g. 0.75,1.0,1.25")
    group.add_argument("--flip", action="store_true", help="also average left-right flipped inputs")
    group.add_argument("--mode", default="whole", choices=("whole", "slide"))
    group.add_argument("--crop", type=cli.size, default="1024x1024", help="slide window HxW")
    group.add_argument("--stride", type=cli.size, default="768x768", help="slide stride HxW")
    return parser


def check_flags(parser, args):
    """The flag combinations that cannot work, as argparse errors."""
    if not all(0.125 <= scale <= 8 for scale in args.scales):
        scales = ",".join(f"{v:g}" for v in args.scales)
        bounds = "each scale must be 0.125 to 8 (mmseg's ms is 0.5 to 1.75)"
        parser.error(f"argument --scales: {scales}: {bounds}")
    if args.mode == "slide" and any(s > c for s, c in zip(args.stride, args.crop)):
        stride, crop = ("x".join(map(str, size)) for size in (args.stride, args.crop))
        larger = f"{stride} is larger than --crop {crop}, so windows would leave pixels unscored"
        parser.error(f"argument --stride: {larger}; use a stride no larger than the crop")
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        folder = "pass a folder (it is created if missing)"
        parser.error(f"argument --out-dir: {args.out_dir} is a file; {folder}")
    return args


def labelled_dataset(args, info, *, model_name, is_main):
    """The split to score (or, for test, to predict), checked against the model's classes `info`."""
    root, split = args.data_root, args.split
    dataset = open_dataset(root, split, dataset_type=args.dataset, with_labels=split != "test")
    if len(dataset) == 0:
        raise DataError(
            f"{root}: the {split} split has no images; pass another --split or --data-root"
        )
    if split == "test" and not args.out_dir:
        raise cli.UsageError(
            f"--split test: {root} has no labels to score it with; "
            "pass --out-dir to write the predictions (e.g. for the test server)"
        )
    if dataset.info.num_classes != info.num_classes:
        data = f"{root} ({dataset.info.name}) has {dataset.info.num_classes}"
        raise cli.CheckpointError(
            f"{model_name}: a model of {info.num_classes} classes, but {data}; "
            "evaluate it on the data it was trained for"
        )
    if not is_main:
        return dataset
    # numbered classes (weights saved without names) are no names to compare
    named = info.name != unnamed_classes(info.num_classes).name
    if named and info.class_names != dataset.info.class_names:
        k, ours, theirs = first_difference(info.class_names, dataset.info.class_names)
        differ = f"class {k}: {ours!r} in the model, {theirs!r} in {root}"
        print(
            f"warning: the model's classes are not the data's ({differ}); "
            "scores are reported under the data's names",
            file=sys.stderr,
        )
    found = f"{dataset.info.name} ({detect_dataset(root, args.dataset)})"
    print(f"dataset: {found}, {dataset.info.num_classes} classes, {len(dataset)} {split} images")
    return dataset


def score(segment, info, args, runtime, *, precision, model_name):
    """Scores `segment` (images -> class map) on the split, or writes predictions for --images;
    prints the table and the JSON line. tools/deploy.py shares it for exported models."""
    if args.images:
        if not args.out_dir:
            raise cli.UsageError("--images needs --out-dir to write the predictions to")
        from interop import find_images

        dataset = SegmentationDataset([(p, None) for p in find_images(args.images)], info)
    else:
        dataset = labelled_dataset(args, info, model_name=model_name, is_main=runtime.is_main)
    if args.format == "compare" and (args.images or args.split == "test"):
        raise cli.UsageError(
            "--format compare shows the ground truth, which --images and the test split have not; "
            "use --format overlay"
        )
    if args.format == "labelIds" and dataset.info.submission_ids is None:
        raise cli.UsageError(
            f"--format labelIds: {dataset.info.name} has no submission ids (Cityscapes only); "
            "use --format trainIds"
        )
    write = None
    if args.out_dir:
        from predictions import prediction_writer  # read only when predictions are written

        write = prediction_writer(dataset, args, runtime)
    result = evaluate(segment, dataset, runtime=runtime, write=write, workers=args.workers)
    if not runtime.is_main:
        return
    mode, names = Inference.from_args(args).name, dataset.info.class_names
    summary = {"mode": mode, "dataset": dataset.info.name, "images": len(dataset)}
    summary |= {"amp": args.amp, "precision": precision}
    summary |= {key: result[key] for key in ("data_s", "model_s", "eval_s")}
    if "mIoU" in result:
        print_table(result, mode, class_names=names)

        def rounded(value):  # JSON has no NaN
            return None if np.isnan(value) else round(value, 2)

        scores = {key: rounded(result[key]) for key in ("mIoU", "mDice", "mAcc", "aAcc")}
        # per_class_precision is the metric; "precision" (above) is the arithmetic's
        summary = {**scores, "classes_in_mean": result["classes_in_mean"], **summary}
        for key in PER_CLASS:
            values = {name: rounded(100 * v) for name, v in zip(names, result[key])}
            summary[f"per_class_{key}".removesuffix("_iou")] = values
    print(json.dumps(summary | ({"out_dir": args.out_dir} if args.out_dir else {})))


def run_evaluation(args):
    if not args.ckpt:
        raise cli.UsageError("--ckpt is required (exported models: python tools/deploy.py --model)")
    runtime = setup_runtime(args.device, args.device_id, amp_dtype=args.amp_dtype)
    if runtime.is_main:
        print(runtime.device_note, runtime.precision_note(args.amp), sep="\n", flush=True)
    model, info = load_model(args.ckpt)
    model = inference_model(model, runtime)
    segment = torch_segmenter(model, runtime, amp=args.amp, options=Inference.from_args(args))
    score(segment, info, args, runtime, precision=runtime.precision(args.amp), model_name=args.ckpt)
    teardown_runtime(runtime)


def main(argv=None):
    parser = evaluation_parser(__doc__)
    cli.main(run_evaluation, check_flags(parser, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
