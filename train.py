"""Train BiSeNetV1. `--recipe` picks a published recipe from RECIPES (default: Ascend ModelZoo's R50
from scratch); any flag given on the command line overrides it.

    python train.py --data-root data/cityscapes                     # Ascend ModelZoo's recipe
    python train.py --recipe mmseg_r18 --data-root data/cityscapes  # mmseg's real-time R18 recipe
    torchrun --nproc-per-node 8 train.py                            # DDP; backend: DIST_BACKEND
    python train.py --recipe mmseg_r18 --print-recipe               # this launch's settings

A run ends with one JSON line: {"iters", "train_fps", "mIoU", "checkpoint", ...}.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import datasets
import workdir
from bisenet import BATCH_OF_TWO, RESNET_LAYOUTS, BiSeNetV1, ModelConfig
from checkpoints import initial_weights, load_backbone, restore
from cityscapes import detect_dataset, open_dataset
from datasets import IGNORE_INDEX, DataError, TrainTransform, read_image
from device import setup_runtime, sgd, teardown_runtime

# Every recipe: its model, images, lr and length on one device, and what else it changes from the
# flags' defaults (Ascend ModelZoo's schedule and augmentation). `scale`, on N devices: "lr" keeps
# the images per device and multiplies lr by N (linear scaling: Ascend's 8 x 8 images at lr 0.2);
# "batch" splits the images in all, lr unchanged (mmseg's R18: 16 images at lr 0.025 on any count).
RECIPES = {
    "ascend_r50": dict(depth=50, batch_size=8, lr=0.025, iters=40000, scale="lr"),
    "mmseg_r18": dict(
        depth=18,
        batch_size=16,
        lr=0.025,
        iters=160000,
        val_interval=16000,
        ckpt_interval=16000,
        scale="batch",
    ),
    "demo": dict(
        depth=18,
        batch_size=8,
        crop=(128, 256),
        scale_range=(0.75, 1.5),
        iters=200,
        lr=0.05,
        warmup_iters=20,
        val_interval=100,
        ckpt_interval=100,
    ),
    # tools/benchmark_learning.py: mmseg 1.x's R18 at a CPU's scale, beside mmseg's own trainer
    "learning": dict(
        depth=18,
        batch_size=4,
        crop=(128, 256),
        lr=0.025,
        iters=300,
        warmup_iters=25,
        lr_schedule="mmengine",
        amp="O0",
    ),
}
PERF_RUN = dict(iters=400, no_validate=True, ckpt_interval=400)  # Ascend ModelZoo's throughput run
RECIPES |= {f"{name}_perf": {**RECIPES[name], **PERF_RUN} for name in ("ascend_r50", "mmseg_r18")}
EARLIER_NAMES = {"seed_r50": "ascend_r50", "seed_r50_perf": "ascend_r50_perf", "r18": "mmseg_r18"}
EARLIER_NAMES["r18_perf"] = "mmseg_r18_perf"

# the settings of a run whose change on --resume is worth a warning (what it learns, not how fast)
RECIPE_FLAGS = """batch_size crop scale_range cat_max_ratio iters lr momentum weight_decay
    warmup_iters warmup warmup_ratio lr_schedule poly_power min_lr loss loss_normalise ohem_thresh
    aux_weight class_weight amp amp_dtype loss_scale seed diff_seed sync_bn world_size
    data_root""".split()
SHARE = cli.real(0, 1, low_open=True)  # a value in (0, 1]


def recipe_settings(name, devices):
    """The per-device flag values of recipe `name` on `devices` devices (see RECIPES)."""
    recipe = dict(RECIPES[name])
    if recipe.pop("scale", "lr") == "lr":
        return {**recipe, "lr": round(recipe["lr"] * devices, 8)}
    images, per_device = recipe["batch_size"], recipe["batch_size"] // devices
    if images % devices or per_device < 2:
        counts = ", ".join(str(n) for n in range(1, images // 2 + 1) if images % n == 0)
        split = f"{devices} devices do not split them into batches of 2 or more"
        fix = f"use {counts} devices, or pass --batch-size"
        raise cli.UsageError(f"--recipe {name} trains {images} images in all; {split}: {fix}")
    return {**recipe, "batch_size": per_device}


def add_model_flags(p):
    model = p.add_argument_group("model")
    model.add_argument("--depth", type=int, choices=sorted(RESNET_LAYOUTS), help="ResNet depth")
    classes = "a check: the class count comes from the dataset (Cityscapes 19, classes.txt)"
    model.add_argument("--num-classes", type=cli.integer(2, 255), help=classes)
    dropout = cli.real(0, 1, high_open=True)
    model.add_argument("--dropout", type=dropout, default=0.1, help="before classifiers (mmseg)")
    model.add_argument("--load-from", help="initial weights: any checkpoint evaluate.py reads")
    model.add_argument("--pretrained", help="ImageNet ResNet weights (torchvision's), path or URL")
    model.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (nccl, hccl)")
    data = p.add_argument_group("batches and augmentation")
    data.add_argument("--batch-size", type=cli.integer(1), help="images per device")
    data.add_argument("--crop", type=cli.size, default="1024x1024", help="HxW")
    data.add_argument("--scale-range", type=cli.ratios(2), default="0.5,2.0", help="rescale ratios")
    ratio = "a crop is drawn again (up to 10 times) while one class covers more than this share"
    data.add_argument("--cat-max-ratio", type=SHARE, default=0.75, help=ratio)
    data.add_argument("--workers", type=cli.integer(0), default=4, help="loaders per device")


def add_schedule_flags(p):
    s = p.add_argument_group("schedule and loss")
    s.add_argument("--iters", type=cli.integer(1), help="training iterations")
    lr = "for this run's devices (the recipe scales it)"
    s.add_argument("--lr", type=cli.real(0, 1e38, low_open=True), help=lr)
    s.add_argument("--momentum", type=cli.real(0, 1), default=0.9, help="SGD")
    s.add_argument("--weight-decay", type=cli.real(0), default=5e-4, help="SGD")
    s.add_argument("--warmup-iters", type=cli.integer(0), default=1000, help="iterations")
    s.add_argument("--warmup", default="linear", choices=("linear", "exp"), help="its shape")
    schedules = "mmcv: poly x warmup (Ascend ModelZoo's); mmengine: warmup, then poly (mmseg 1.x)"
    s.add_argument("--lr-schedule", default="mmcv", choices=("mmcv", "mmengine"), help=schedules)
    s.add_argument("--warmup-ratio", type=SHARE, default=0.1, help="warmup's first lr / lr")
    s.add_argument("--poly-power", type=cli.real(0), default=0.9, help="poly decay's exponent")
    s.add_argument("--min-lr", type=cli.real(0), default=1e-4, help="the lr poly decays to")
    s.add_argument("--loss", default="ce", choices=("ce", "ohem"), help="ohem: CoinCheung's")
    s.add_argument("--ohem-thresh", type=SHARE, default=0.7, help="OHEM's probability")
    s.add_argument("--aux-weight", type=cli.real(0), default=1.0, help="aux heads' loss weight")
    weights = "CE class weights: a file of one number per class, or auto: ENet's 1/ln(1.02 + share)"
    s.add_argument("--class-weight", help=weights)
    divisor = "CE's divisor: every pixel (Ascend ModelZoo's and mmseg's), or the labelled ones"
    s.add_argument("--loss-normalise", choices=("all", "valid"), help=divisor)
    s.add_argument("--seed", type=cli.integer(0), default=36436756, help="the random seed")
    s.add_argument("--diff-seed", "--diff_seed", action="store_true", help="dropout seed per rank")


def add_run_flags(p):
    run = p.add_argument_group("run")
    run.add_argument("--work-dir", default="work_dirs/bisenetv1", help="checkpoints, log, pictures")
    run.add_argument("--resume", action="store_true", help="continue --work-dir's run, if any")
    keep = "keep only the newest N iter_N.pth (0: all); best.pth is always kept"
    run.add_argument("--keep-checkpoints", type=cli.integer(0), default=0, help=keep)
    run.add_argument("--no-validate", action="store_true", help="no val mIoU during training")
    run.add_argument("--val-interval", type=cli.integer(1), default=4000, help="iterations")
    run.add_argument("--ckpt-interval", type=cli.integer(1), default=4000, help="iterations")
    run.add_argument("--log-interval", type=cli.integer(1), default=50, help="iterations")
    scale = "fp16: a static loss scale (Ascend's port: 128); default: dynamic"
    run.add_argument("--loss-scale", type=cli.real(0, low_open=True), help=scale)
    layout = "default: on for CUDA and AVX-512 CPUs, off for AVX2 CPUs and Ascend"
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help=layout)
    compiled = "torch.compile the training model (compiling takes minutes; docs/performance.md)"
    run.add_argument("--compile", action="store_true", help=compiled)


def parse_args(argv=None):
    """The recipe's values on this launch's WORLD_SIZE are the defaults; the command line wins."""
    pre = cli.ArgumentParser(add_help=False)  # reads --recipe first, so -h shows its values
    names = sorted(RECIPES) + sorted(EARLIER_NAMES)
    pre.add_argument("--recipe", default="ascend_r50", choices=names, help="flags override it")
    p = cli.ArgumentParser(__doc__, parents=[pre])
    p.add_argument("--print-recipe", action="store_true", help="print this launch's recipe as JSON")
    cli.add_data_flags(p)
    cli.add_device_flags(p)
    add_model_flags(p)
    add_schedule_flags(p)
    add_run_flags(p)
    name = pre.parse_known_args(argv)[0].recipe
    recipe = EARLIER_NAMES.get(name, name)
    try:
        p.set_defaults(**recipe_settings(recipe, int(os.environ.get("WORLD_SIZE", "1"))))
    except cli.UsageError as e:
        p.error(str(e))
    args = p.parse_args(argv)
    args.recipe = recipe
    low, high = args.scale_range
    if low > high:
        order = "the smaller ratio comes first, e.g. 0.5,2.0"
        p.error(f"argument --scale-range: {low:g},{high:g}: {order}")
    if args.loss == "ohem" and args.loss_normalise:
        ohem = "OHEM averages over the hard pixels it keeps; --loss-normalise applies to --loss ce"
        p.error(f"argument --loss-normalise: {ohem}")
    args.loss_normalise = args.loss_normalise or "all"
    if args.lr_schedule == "mmengine" and args.warmup == "exp":
        fix = "use --lr-schedule mmcv for an exponential warmup"
        p.error(f"argument --warmup exp: mmengine's schedule warms up linearly (LinearLR); {fix}")
    if args.min_lr > args.lr:
        decay = "the poly schedule decays from --lr to --min-lr"
        p.error(f"argument --min-lr: {args.min_lr:g} is above --lr {args.lr:g}; {decay}")
    return args


# -- Schedule and loss -----------------------------------------------------------------------------
def learning_rate(
    it,
    *,
    base_lr,
    iters,
    min_lr=1e-4,
    power=0.9,
    warmup_iters=0,
    warmup="linear",
    warmup_ratio=0.1,
    schedule="mmcv",
):
    """The lr at 0-based iteration `it`. mmcv (Ascend ModelZoo's, mmseg 0.x): poly over all
    iterations, times the warmup factor while warming up. mmengine (mmseg 1.x's configs): LinearLR
    from warmup_ratio to 1 over the warmup, then PolyLR from base_lr over the iterations left."""
    if schedule == "mmengine":
        if it < warmup_iters:  # LinearLR(begin=0, end=W) reaches 1 at W - 1
            return base_lr * (warmup_ratio + (1 - warmup_ratio) * it / max(warmup_iters - 1, 1))
        # PolyLR(begin=W, end=iters) reaches min_lr at iters - 1
        progress = (it - warmup_iters) / max(iters - warmup_iters - 1, 1)
        return (base_lr - min_lr) * (1 - min(progress, 1)) ** power + min_lr
    lr = (base_lr - min_lr) * (1 - it / iters) ** power + min_lr
    if it < warmup_iters:
        left = 1 - it / warmup_iters  # the share of warmup still to go
        lr *= 1 - left * (1 - warmup_ratio) if warmup == "linear" else warmup_ratio**left
    return lr


def ohem_cross_entropy(logits, labels, *, thresh, weight=None):
    """CoinCheung's OHEM: mean loss of the pixels harder than -log(thresh), at least labelled/16."""
    loss = F.cross_entropy(logits, labels, weight, ignore_index=IGNORE_INDEX, reduction="none")
    n_min = int((labels != IGNORE_INDEX).sum()) // 16
    hard = loss[loss > -math.log(thresh)]
    if hard.numel() < n_min:
        hard = loss.flatten().topk(n_min).values
    return hard.mean() if hard.numel() else loss.sum() * 0  # no labelled pixel: adds nothing


def segmentation_loss(
    outputs,
    labels,
    *,
    loss_type="ce",
    ohem_thresh=0.7,
    aux_weight=1.0,
    normalise="all",
    class_weight=None,
):
    """Main head + aux_weight x each auxiliary head, on the fp32 logits the heads return (O1's
    loss in fp32). CE is the labelled pixels' sum divided by all pixels (all: mmseg's
    avg_non_ignore=False, as Ascend ModelZoo ran), or by the labelled ones (valid: CoinCheung's);
    class_weight scales each class's pixels (mmseg's)."""

    def head_loss(logits):
        if loss_type == "ohem":
            return ohem_cross_entropy(logits, labels, thresh=ohem_thresh, weight=class_weight)
        ce = F.cross_entropy(
            logits, labels, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if normalise == "valid":  # no labelled pixel: loss 0
            return ce / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return ce / labels.numel()

    main, *auxiliary = outputs
    return head_loss(main) + aux_weight * sum(head_loss(a) for a in auxiliary)


def class_weights(spec, counts, num_classes, runtime, resumed):
    """--class-weight as a tensor on the device, or None. auto: ENet's 1 / ln(1.02 + p) of each
    class's share p of the labelled training pixels (rank 0's histogram, sent to all). A resumed run
    keeps its first weights (`resumed`): auto is never recomputed, a changed file is refused."""
    if spec is None:
        return None
    if spec == "auto":
        if resumed:
            return torch.tensor(resumed, device=runtime.device)
        counts = torch.zeros(256) if counts is None else torch.from_numpy(counts)
        shares = counts[:num_classes].double() / max(counts[:num_classes].sum(), 1)
        return runtime.broadcast(1 / torch.log(1.02 + shares.float()))
    try:
        weights = torch.tensor([float(v) for v in Path(spec).read_text().replace(",", " ").split()])
    except (OSError, ValueError) as e:
        error, fix = cli.first_line(e), f"pass a text file of {num_classes} numbers, or auto"
        raise cli.UsageError(f"--class-weight {spec}: cannot read it ({error}); {fix}") from None
    usable = weights.isfinite().all() and (weights >= 0).all() and weights.any()
    if len(weights) != num_classes or not usable:
        expected = f"expected {num_classes} finite weights >= 0, not all 0 (one per class)"
        raise cli.UsageError(f"--class-weight {spec}: {expected}; got {len(weights)} values")
    if resumed and weights.tolist() != resumed:
        fix = "restore the file, or start a new run from its weights with --load-from"
        changed = f"changed since the run began ({resumed} -> {weights.tolist()})"
        raise cli.UsageError(f"--class-weight {spec}: {changed}; {fix}")
    return weights.to(runtime.device)


# -- Model -----------------------------------------------------------------------------------------
def create_model(
    runtime, *, depth, num_classes, dropout, channels_last, load_from=None, pretrained=None, log
):
    config, state = ModelConfig(depth, num_classes, dropout=dropout), None
    if load_from:
        config, state = initial_weights(load_from, config, log=log)
    model = BiSeNetV1(config)
    if state is not None:
        model.load_state_dict(state, strict=False)
    if pretrained:
        load_backbone(model, pretrained, log=log)
    layout = torch.channels_last if channels_last else torch.preserve_format
    return model.to(runtime.device, memory_format=layout)


def data_parallel(model, runtime):
    """Buffers stay per rank (Ascend's port, mmengine); validation first shares rank 0's."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=runtime.ddp_device_ids, broadcast_buffers=False
    )


def train_step(model, optimizer, *, scaler, images, labels, loss_fn, autocast):
    """One SGD step; loss_fn(outputs, labels) -> loss, autocast() -> the precision context."""
    with autocast():
        outputs = model(images)
    loss = loss_fn(outputs, labels)
    optimizer.zero_grad()  # each optimizer's default: NpuFusedSGD zeroes its combined buffer
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def trains_channels_last(args, runtime):
    """Whether the model and its batches are channels_last: --channels-last, else the device's."""
    return runtime.prefers_channels_last if args.channels_last is None else args.channels_last


def seed_for(seed, diff_seed, *, rank, iteration):
    """Torch's RNG (dropout) is reseeded from (seed, rank, iteration) before every step, so a run
    resumed from any iteration continues exactly, on any world size."""
    return (seed * 1000003 + (rank if diff_seed else 0) * 7919 + iteration) % 2**63


# -- Building a run, then running it ---------------------------------------------------------------
def build_runtime(args):
    """The device, checked against the flags before anything is loaded."""
    runtime = setup_runtime(args.device, args.device_id, amp_dtype=args.amp_dtype)
    if runtime.is_main:
        tqdm.write(runtime.device_note)
    runtime.check_options(compile=args.compile, channels_last=args.channels_last)
    if args.loss_scale and not runtime.grad_scaler(args.amp).is_enabled():
        why = f"this run computes in {runtime.precision(args.amp)}, which has no loss scaling"
        raise cli.UsageError(f"--loss-scale {args.loss_scale:g}: {why}; leave --loss-scale out")
    if args.sync_bn and runtime.distributed and runtime.backend == "gloo":
        raise cli.UsageError("--sync-bn needs nccl or hccl; gloo (CPU) has no SyncBatchNorm")
    if args.batch_size < 2 and not (args.sync_bn and runtime.distributed):
        raise cli.UsageError(f"--batch-size 1: {BATCH_OF_TWO}")
    return runtime


def build_data(args):
    """(training set, val set or None); the data's classes are the model's."""
    transform = TrainTransform(args.crop, args.scale_range, cat_max_ratio=args.cat_max_ratio)
    dataset = open_dataset(args.data_root, "train", dataset_type=args.dataset, transform=transform)
    if not dataset.samples:
        raise DataError(f"{args.data_root}: the train split has no images; check the data root")
    height, width = read_image(dataset.samples[0][0]).shape[:2]
    (crop_h, crop_w), largest = args.crop, args.scale_range[1]
    if crop_h > height * largest or crop_w > width * largest:
        larger = f"is larger than the {height}x{width} images even at the largest scale {largest:g}"
        raise cli.UsageError(f"--crop {crop_h}x{crop_w} {larger}; use a smaller --crop")
    info = dataset.info
    if args.num_classes is not None and args.num_classes != info.num_classes:
        has = f"{args.data_root} ({info.name}) has {info.num_classes} classes"
        raise cli.UsageError(f"--num-classes {args.num_classes}: {has}; leave --num-classes out")
    if args.no_validate:
        return dataset, None
    return dataset, open_dataset(args.data_root, "val", dataset_type=args.dataset)


def build_state(args, runtime, info, checkpoint, resumed_from, log):
    """(model, optimizer, scaler, first iteration, best mIoU): fresh, or as checkpoint left them."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    shape = dict(depth=args.depth, num_classes=info.num_classes, dropout=args.dropout)
    initial = dict(load_from=args.load_from, pretrained=args.pretrained)
    layout = trains_channels_last(args, runtime)
    model = create_model(runtime, **shape, **initial, channels_last=layout, log=log)
    if args.sync_bn and runtime.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sgd_settings = dict(momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer = sgd(model.parameters(), lr=args.lr, **sgd_settings, kernel=runtime.sgd_kernel)
    scaler = runtime.grad_scaler(args.amp, args.loss_scale)
    start, best = 0, None
    if checkpoint is not None:
        state = dict(model=model, optimizer=optimizer, scaler=scaler, runtime=runtime, info=info)
        start, best = restore(checkpoint, resumed_from, **state)
        best = best if best is not None and math.isfinite(best) else None  # older runs saved NaN
        if start > args.iters:
            at = f"the run in {args.work_dir} is at iteration {start} already"
            fix = f"pass --iters above {start} to train on"
            raise cli.UsageError(f"--iters {args.iters}: {at}; {fix}")
        complete = ": it is complete, nothing to train" if start == args.iters else ""
        log(f"resumed from {resumed_from.resolve()} at iteration {start}{complete}")
        current = {**vars(args), "world_size": runtime.world_size}
        changes = workdir.changed_settings(checkpoint.get("args", {}), current, RECIPE_FLAGS)
        if changes:
            log(f"warning: resuming with settings that differ from the run's: {changes}")
    for group in optimizer.param_groups:  # a resumed run takes this command's values, not its own
        group.update(**sgd_settings)
    return model, optimizer, scaler, start, best


def finish(args, runtime, progress, run_log, hooks):
    """The JSON line a run ends with."""
    result, best = hooks["validation"].result, hooks["checkpointer"].best
    checkpoint = hooks["checkpointer"].path
    miou = round(result["mIoU"], 2) if result and math.isfinite(result["mIoU"]) else None
    summary = {"iters": args.iters, **progress.summary(), "mIoU": miou}
    summary["best_mIoU"] = round(best, 2) if best is not None else None
    summary["checkpoint"] = str(checkpoint.resolve()) if checkpoint else None
    summary |= {"device": str(runtime.device), "world_size": runtime.world_size}
    summary |= {"backend": runtime.backend, "amp": args.amp}
    summary |= {"precision": runtime.precision(args.amp), "depth": args.depth}
    summary["unlabelled_batches"] = hooks["step_check"].unlabelled
    run_log.record({"iter": args.iters, "summary": summary})
    run_log.draw(wait=True)
    if runtime.is_main:
        print(json.dumps(summary), flush=True)
    return summary


def label_counts(args, dataset, work_dir, run_log):
    """Says what the run trains on; on rank 0, the labels' pixels per value (checked, cached)."""
    info, layout = dataset.info, detect_dataset(args.data_root, args.dataset)
    images = f"{info.num_classes} classes, {len(dataset)} training images"
    run_log.message(f"dataset: {info.name} ({layout}), {images}")
    if not run_log.enabled:
        return None
    cache, processes = work_dir / "label_histogram.json", max(args.workers, 1)
    return datasets.training_label_counts(
        dataset, cache, source=args.data_root, processes=processes, log=run_log.message
    )


def train(args):
    """Builds the run, then runs it. A stop signal ends it with its line from the start; the signal
    handlers, the log, the work dir's lock and the process group are released however it ends."""
    work_dir = Path(args.work_dir)
    with contextlib.ExitStack() as cleanup:
        preemption = cleanup.enter_context(workdir.Preemption(work_dir))
        runtime = build_runtime(args)
        cleanup.callback(teardown_runtime, runtime)
        dataset, val_set = build_data(args)
        lock, checkpoint, resumed_from = workdir.open_work_dir(
            work_dir, args.resume, runtime=runtime, log=tqdm.write
        )
        if lock:
            cleanup.callback(lock.close)
        run_log = cleanup.enter_context(workdir.RunLog(work_dir, runtime.is_main))
        counts = label_counts(args, dataset, work_dir, run_log)
        resumed = (checkpoint or {}).get("args", {}).get("class_weights")
        info = dataset.info
        weights = class_weights(args.class_weight, counts, info.num_classes, runtime, resumed)
        run_log.message(runtime.precision_note(args.amp))
        state = build_state(args, runtime, info, checkpoint, resumed_from, run_log.message)
        del checkpoint  # its tensors are in the model and optimizer now
        return run(
            args, runtime, state, dataset, val_set, weights, resumed_from, preemption, run_log
        )


def run(args, runtime, state, dataset, val_set, weights, resumed_from, preemption, run_log):
    """The loop's periodic work and loss, the loop, then the JSON line."""
    model, optimizer, scaler, start, best = state
    run_log.start(start)
    settings = {**vars(args), "world_size": runtime.world_size}
    settings["class_weights"] = None if weights is None else weights.tolist()
    contents = dict(optimizer=optimizer, scaler=scaler, settings=settings, dataset=dataset.info)
    every = dict(interval=args.ckpt_interval, iters=args.iters, keep=args.keep_checkpoints)
    resumed = dict(path=resumed_from, best=best)
    checkpointer = workdir.Checkpointer(run_log, model, contents=contents, **every, **resumed)
    scoring = dict(runtime=runtime, amp=args.amp, workers=min(args.workers, 2))
    validation = workdir.Validation(
        val_set, model, checkpointer, **scoring, interval=args.val_interval
    )
    step_check = workdir.StepCheck(scaler, run_log, static_scale=args.loss_scale)
    hooks = dict(step_check=step_check, preemption=preemption)
    hooks |= dict(checkpointer=checkpointer, validation=validation)
    kind = dict(loss_type=args.loss, ohem_thresh=args.ohem_thresh, normalise=args.loss_normalise)
    weighted = dict(aux_weight=args.aux_weight, class_weight=weights)
    loss_fn = functools.partial(segmentation_loss, **kind, **weighted)
    progress = run_loop(args, runtime, state, loss_fn, dataset, run_log, hooks)
    return finish(args, runtime, progress, run_log, hooks)


def run_loop(args, runtime, state, loss_fn, dataset, run_log, hooks):
    """One step per batch, then each periodic work (the checkpoint first: a validation that fails
    never costs the interval). Returns the workdir.Progress that timed it."""
    model, optimizer, scaler, start, _ = state
    step_check, checkpointer = hooks["step_check"], hooks["checkpointer"]
    validation, preemption = hooks["validation"], hooks["preemption"]
    schedule = dict(base_lr=args.lr, power=args.poly_power, schedule=args.lr_schedule)
    named_alike = ("iters", "min_lr", "warmup_iters", "warmup", "warmup_ratio")
    schedule |= {name: getattr(args, name) for name in named_alike}
    lr_at = functools.partial(learning_rate, **schedule)
    stepped = data_parallel(model, runtime) if runtime.distributed else model
    stepped = torch.compile(stepped) if args.compile else stepped
    sgd_step = functools.partial(train_step, stepped, optimizer, scaler=scaler, loss_fn=loss_fn)
    autocast = functools.partial(runtime.autocast, args.amp)
    span = dict(start=start, iters=args.iters)
    batches = dict(batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    loader = datasets.training_loader(dataset, **batches, **span, runtime=runtime)
    per_iter = args.batch_size * runtime.world_size
    progress = workdir.Progress(
        run_log, interval=args.log_interval, **span, images_per_iter=per_iter
    )
    layout = trains_channels_last(args, runtime)
    it = start
    preemption.loop_begins()
    with progress.bar, stopping(runtime, checkpointer, preemption, lambda: it):
        tick = time.perf_counter()
        for it, batch in enumerate(loader, start):
            data_time, lr = time.perf_counter() - tick, lr_at(it)
            torch.manual_seed(seed_for(args.seed, args.diff_seed, rank=runtime.rank, iteration=it))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["image"].to(runtime.device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last) if layout else images
            labels = batch["label"].to(runtime.device, non_blocking=True).long()
            loss = sgd_step(images=images, labels=labels, autocast=autocast).item()
            step_check.step(it, loss, labels)
            step_time = time.perf_counter() - tick
            progress.step(it, loss=loss, lr=lr, data_time=data_time, step_time=step_time)
            checkpointer.step(it)
            with workdir.saved_on_error(checkpointer, it):
                validation.step(it)
            preemption.step(it, runtime, checkpointer)
            tick = time.perf_counter()
    return progress


@contextlib.contextmanager
def stopping(runtime, checkpointer, preemption, iteration):
    """How the loop ends early: a collective broken by a peer that the launcher stopped first
    (which said why) quietly, a full disk after saving what fits, Ctrl-C with where to resume."""
    saved = lambda: workdir.last_checkpoint_note(checkpointer.work_dir)  # noqa: E731
    try:
        yield
    except RuntimeError:
        if preemption.signum and runtime.distributed:
            sys.exit(128 + preemption.signum)
        raise
    except workdir.LogUnwritable as e:
        with contextlib.suppress(cli.Error, OSError):  # no room for it either: the last one stays
            checkpointer.step(iteration(), now=True)
        resume = f"then run the same command with --resume. {saved()}"
        raise workdir.TrainingError(f"{e}, {resume}") from None
    except KeyboardInterrupt:
        at = f"interrupted at iteration {iteration() + 1}"
        resume = f"{saved()} Run the same command with --resume to continue."
        raise workdir.Stopped(f"{at}; {resume}", signal.SIGINT) from None


def main(argv=None):
    args = parse_args(argv)
    if args.print_recipe:  # what the launch scripts show with DRY_RUN=1
        settings = {name: getattr(args, name) for name in RECIPES[args.recipe] if name != "scale"}
        print(json.dumps({"recipe": args.recipe, **settings}))
        return
    try:
        cli.main(train, args)
    except SystemExit as e:  # run_8p.sh: an error that a restart would repeat ends the group
        if e.code == 2 and (launcher := os.environ.get("BISENET_LAUNCHER_PID")):
            # leaves just after the launcher signalled every rank
            signal.signal(signal.SIGTERM, lambda *_: time.sleep(1) or sys.exit(2))
            os.kill(int(launcher), signal.SIGUSR2)
            time.sleep(60)
        raise
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
