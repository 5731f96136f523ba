"""Train BiSeNetV1. `--recipe` picks a published recipe from RECIPES (default: the seed's, Ascend ModelZoo's R50
from scratch); any flag given on the command line overrides it.

    python train.py --data-root data/cityscapes                           # the seed's recipe on one device
    python train.py --recipe r18 --data-root data/cityscapes              # mmseg's real-time R18 recipe
    torchrun --nproc-per-node 8 train.py                                  # DDP; backend from DIST_BACKEND
    python train.py --recipe r18 --print-recipe                           # the settings a recipe gives this launch

A run ends with one JSON line: {"iters", "train_fps", "mIoU", "checkpoint", ...}.
"""

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
from bisenet import RESNET_LAYOUTS, BiSeNetV1, ModelConfig
from checkpoints import (
    last_checkpoint_note,
    load_backbone,
    load_model,
    open_work_dir,
    point_latest,
    prune,
    restore,
    save_checkpoint,
)
from cityscapes import detect_dataset, open_dataset
from cli import CheckpointError, atomic_write
from datasets import (
    IGNORE_INDEX,
    DataError,
    TrainTransform,
    ignore_stop_signals,
    label_histogram,
    read_image,
)
from device import setup_runtime, sgd, teardown_runtime
from evaluate import evaluate, torch_segmenter

# Every recipe: its model, images, lr and length for one device, and what else it changes from the flags' defaults
# (which are the seed's schedule and augmentation). `scale` says how it runs on N devices:
# "lr" keeps the images per device and multiplies lr by N (linear scaling: the seed's 8 x 8 images at lr 0.2);
# "batch" keeps the images in all and splits them, lr unchanged (mmseg's R18: 16 images at lr 0.025 on any count).
RECIPES = {
    "seed_r50": dict(depth=50, batch_size=8, lr=0.025, iters=40000, scale="lr"),
    "r18": dict(
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
    # tools/benchmark_learning.py: mmseg 1.x's R18 config at a CPU's scale, beside mmseg's own trainer
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
PERF_RUN = dict(
    iters=400, no_validate=True, ckpt_interval=400
)  # Ascend ModelZoo's throughput run of a recipe
RECIPES |= {f"{name}_perf": {**RECIPES[name], **PERF_RUN} for name in ("seed_r50", "r18")}

# the flags of a run whose change on --resume is worth a warning (the recipe, not where or how fast it runs)
RECIPE_FLAGS = """batch_size crop scale_range cat_max_ratio iters lr momentum weight_decay warmup_iters warmup warmup_ratio lr_schedule poly_power min_lr loss
    loss_normalise ohem_thresh aux_weight class_weight amp amp_dtype loss_scale seed diff_seed sync_bn""".split()


class TrainingError(cli.Error):
    """Training cannot go on (e.g. a non-finite loss in fp32). The message says where and what to do."""


class LogUnwritable(TrainingError):
    """log.jsonl or TensorBoard's file cannot be written (a full disk): the loop keeps its step if a checkpoint fits."""


class Stopped(TrainingError):
    """Ctrl-C, SIGTERM or SIGUSR1 stopped the run, which resumes from its checkpoint; the exit code is 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def recipe_settings(name, devices):
    """The per-device flag values of recipe `name` on `devices` devices (see RECIPES)."""
    recipe = dict(RECIPES[name])
    scale = recipe.pop("scale", "lr")
    if scale == "lr":
        return {**recipe, "lr": round(recipe["lr"] * devices, 8)}
    images, per_device = recipe["batch_size"], recipe["batch_size"] // devices
    if images % devices or per_device < 2:
        counts = ", ".join(str(n) for n in range(1, images // 2 + 1) if images % n == 0)
        split = f"{devices} devices do not split them into batches of 2 or more: use {counts} devices, or pass --batch-size"
        raise cli.UsageError(f"--recipe {name} trains {images} images in all; {split}")
    return {**recipe, "batch_size": per_device}


def add_training_flags(p):
    model = p.add_argument_group("model")
    model.add_argument(
        "--depth", type=int, choices=sorted(RESNET_LAYOUTS), help="ResNet context path"
    )
    model.add_argument(
        "--num-classes",
        type=cli.integer(2, 255),
        help="a check: the class count comes from the dataset (Cityscapes 19, classes.txt)",
    )
    model.add_argument(
        "--dropout",
        type=cli.real(0, 1, high_open=True),
        default=0.1,
        help="before each head's classifier (mmseg)",
    )
    model.add_argument("--load-from", help="initial weights: any checkpoint evaluate.py reads")
    model.add_argument(
        "--pretrained", help="ImageNet ResNet weights (torchvision format), path or URL"
    )
    model.add_argument("--sync-bn", action="store_true")
    data = p.add_argument_group("data")
    data.add_argument("--batch-size", type=cli.integer(1), help="images per device")
    data.add_argument("--crop", type=cli.size, default="1024x1024", help="HxW")
    data.add_argument(
        "--scale-range", type=cli.ratios(2), default="0.5,2.0", help="random rescale ratio range"
    )
    data.add_argument("--cat-max-ratio", type=cli.real(0, 1, low_open=True), default=0.75)
    data.add_argument(
        "--workers", type=cli.integer(0), default=4, help="data loading processes per device"
    )
    schedule = p.add_argument_group("schedule and loss")
    schedule.add_argument("--iters", type=cli.integer(1), help="training iterations")
    schedule.add_argument(
        "--lr",
        type=cli.real(0, 1e38, low_open=True),
        help="for this run's devices (the recipe scales it)",
    )
    schedule.add_argument("--momentum", type=cli.real(0, 1), default=0.9)
    schedule.add_argument("--weight-decay", type=cli.real(0), default=5e-4)
    schedule.add_argument("--warmup-iters", type=cli.integer(0), default=1000)
    schedule.add_argument("--warmup", default="linear", choices=("linear", "exp"))
    schedule.add_argument(
        "--lr-schedule",
        default="mmcv",
        choices=("mmcv", "mmengine"),
        help="mmcv: poly over all iterations x warmup (the seed's); mmengine: warmup, then poly (mmseg 1.x)",
    )
    schedule.add_argument("--warmup-ratio", type=cli.real(0, 1, low_open=True), default=0.1)
    schedule.add_argument("--poly-power", type=cli.real(0), default=0.9)
    schedule.add_argument("--min-lr", type=cli.real(0), default=1e-4)
    schedule.add_argument("--loss", default="ce", choices=("ce", "ohem"))
    schedule.add_argument("--ohem-thresh", type=cli.real(0, 1, low_open=True), default=0.7)
    schedule.add_argument("--aux-weight", type=cli.real(0), default=1.0)
    schedule.add_argument(
        "--class-weight",
        help="CE weight per class: a text file of one number per class, or auto (ENet's 1/ln(1.02 + share))",
    )
    schedule.add_argument(
        "--loss-normalise",
        choices=("all", "valid"),
        help="CE's divisor: every pixel (default: the seed's and mmseg's), or the labelled ones",
    )
    schedule.add_argument("--seed", type=cli.integer(0), default=36436756)
    schedule.add_argument(
        "--diff-seed",
        "--diff_seed",
        dest="diff_seed",
        action="store_true",
        help="different dropout seed per rank",
    )
    run = p.add_argument_group("run")
    run.add_argument("--work-dir", default="work_dirs/bisenetv1")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --work-dir from its newest checkpoint, if it has one",
    )
    run.add_argument(
        "--keep-checkpoints",
        type=cli.integer(0),
        default=0,
        help="keep only the newest N iter_N.pth (0: all); best.pth is always kept",
    )
    run.add_argument("--no-validate", action="store_true")
    run.add_argument("--val-interval", type=cli.integer(1), default=4000)
    run.add_argument("--ckpt-interval", type=cli.integer(1), default=4000)
    run.add_argument("--log-interval", type=cli.integer(1), default=50)
    run.add_argument(
        "--loss-scale",
        type=cli.real(0, low_open=True),
        help="fp16: a static loss scale (Ascend's port: 128); default: dynamic",
    )
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="default: on for CUDA and AVX-512 CPUs, off for AVX2 CPUs and Ascend",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training model (compiling takes minutes; see PERFORMANCE.md)",
    )


def parse_args(argv=None):
    """The recipe's values become the defaults (scaled to this launch's WORLD_SIZE), then the command line is read."""
    pre = cli.ArgumentParser(
        add_help=False
    )  # reads --recipe first, so that -h shows the recipe's values
    pre.add_argument(
        "--recipe",
        default="seed_r50",
        choices=sorted(RECIPES),
        help="the published recipe; flags override it",
    )
    p = cli.ArgumentParser(__doc__, parents=[pre])
    p.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the recipe's settings for this launch as JSON and exit",
    )
    cli.add_data_flags(p)
    cli.add_device_flags(p)
    add_training_flags(p)
    recipe = pre.parse_known_args(argv)[0].recipe
    try:
        p.set_defaults(**recipe_settings(recipe, int(os.environ.get("WORLD_SIZE", "1"))))
    except cli.UsageError as e:
        p.error(str(e))
    args = p.parse_args(argv)
    if args.scale_range[0] > args.scale_range[1]:
        p.error(
            f"argument --scale-range: {args.scale_range[0]:g},{args.scale_range[1]:g}: the smaller ratio comes first, e.g. 0.5,2.0"
        )
    if args.loss == "ohem" and args.loss_normalise:
        p.error(
            "argument --loss-normalise: OHEM averages over the hard pixels it keeps; --loss-normalise applies to --loss ce"
        )
    args.loss_normalise = args.loss_normalise or "all"
    if args.lr_schedule == "mmengine" and args.warmup == "exp":
        p.error(
            "argument --warmup exp: mmengine's schedule warms up linearly (LinearLR); use --lr-schedule mmcv for an exponential warmup"
        )
    if args.min_lr > args.lr:
        p.error(
            f"argument --min-lr: {args.min_lr:g} is above --lr {args.lr:g}; the poly schedule decays from --lr to --min-lr"
        )
    return args


# -- Schedule and loss ----------------------------------------------------------------------------------------
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
    """The lr at 0-based iteration `it`; bind the numbers with functools.partial. mmcv (the seed's, mmseg 0.x): poly
    over all iterations, multiplied by the warmup factor while warming up. mmengine (mmseg 1.x's configs): LinearLR
    from warmup_ratio to 1 over the warmup, then PolyLR from base_lr over the iterations after it."""
    if schedule == "mmengine":
        if it < warmup_iters:  # LinearLR(begin=0, end=W) reaches 1 at W - 1
            return base_lr * (warmup_ratio + (1 - warmup_ratio) * it / max(warmup_iters - 1, 1))
        progress = (it - warmup_iters) / max(
            iters - warmup_iters - 1, 1
        )  # PolyLR(begin=W, end=iters) reaches min_lr at iters - 1
        return (base_lr - min_lr) * (1 - min(progress, 1)) ** power + min_lr
    lr = (base_lr - min_lr) * (1 - it / iters) ** power + min_lr
    if it < warmup_iters:
        left = 1 - it / warmup_iters  # the share of warmup still to go
        lr *= 1 - left * (1 - warmup_ratio) if warmup == "linear" else warmup_ratio**left
    return lr


def ohem_cross_entropy(logits, labels, *, thresh, weight=None):
    """CoinCheung's OHEM: mean loss of pixels harder than -log(thresh), at least valid/16 of them."""
    loss = F.cross_entropy(
        logits, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="none"
    ).flatten()
    n_min = int((labels != IGNORE_INDEX).sum()) // 16
    hard = loss[loss > -math.log(thresh)]
    if hard.numel() < n_min:
        hard = loss.topk(n_min).values
    return (
        hard.mean() if hard.numel() else loss.sum() * 0
    )  # a batch without labelled pixels adds nothing


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
    """Main head + aux_weight x each aux head, on the fp32 logits the heads return (O1's loss in fp32). CE is the
    labelled pixels' sum divided by all pixels (all: mmseg's avg_non_ignore=False, as the seed ran), or by the
    labelled ones (valid: CoinCheung's); class_weight scales each pixel's term by its class's weight (mmseg's)."""

    def head_loss(logits):
        if loss_type == "ohem":
            return ohem_cross_entropy(logits, labels, thresh=ohem_thresh, weight=class_weight)
        pixels = (
            (labels != IGNORE_INDEX).sum().clamp(min=1) if normalise == "valid" else labels.numel()
        )  # no labelled pixel: loss 0
        return (
            F.cross_entropy(
                logits, labels, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            / pixels
        )

    main, *aux = outputs
    return head_loss(main) + aux_weight * sum(head_loss(a) for a in aux)


# -- Data -----------------------------------------------------------------------------------------------------
class IterationSampler(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for iterations start..iters-1. Epoch e is a permutation seeded by (seed, e),
    of which iteration i of rank r takes its own slice (drop_last). Augmentation seeds are (seed, iteration, rank, slot):
    nothing depends on worker processes, so a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, size, *, batch_size, rank, world_size, seed, start, iters):
        self.per_epoch = size // (batch_size * world_size)
        if self.per_epoch == 0:
            raise cli.UsageError(
                f"{size} training images cannot fill one batch of {batch_size} x {world_size} devices; lower --batch-size"
            )
        (
            self.size,
            self.batch_size,
            self.rank,
            self.world_size,
            self.seed,
            self.start,
            self.iters,
        ) = size, batch_size, rank, world_size, seed, start, iters

    def __iter__(self):
        epoch, order = None, None
        for it in range(self.start, self.iters):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                order = torch.randperm(
                    self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)
                ).tolist()
            first = ((it % self.per_epoch) * self.world_size + self.rank) * self.batch_size
            yield [
                (order[first + k], (self.seed, it, self.rank, k)) for k in range(self.batch_size)
            ]


def training_loader(dataset, *, batch_size, workers, seed, start, iters, runtime):
    sampler = IterationSampler(
        len(dataset),
        batch_size=batch_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=seed,
        start=start,
        iters=iters,
    )
    # one pass over all iterations, so no persistent workers; its own generator keeps the loader off dropout's RNG
    loading = dict(
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator(),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        **loading,
        pin_memory=runtime.pin_memory,
        pin_memory_device=runtime.pin_memory_device,
    )


# -- Model ----------------------------------------------------------------------------------------------------
CLASSIFIERS = ("head.classifier.", "aux_head16.classifier.", "aux_head32.classifier.")


def create_model(
    runtime,
    *,
    depth,
    num_classes,
    dropout,
    channels_last,
    load_from=None,
    pretrained=None,
    sync_bn=False,
    log=print,
):
    config = ModelConfig(depth, num_classes, dropout=dropout)
    source = None
    if load_from:
        source = load_model(load_from)[0]
        if source.config.depth != depth:
            raise CheckpointError(
                f"{load_from}: a ResNet-{source.config.depth} model; pass --depth {source.config.depth}"
            )
        config = dataclasses.replace(
            source.config, dropout=dropout, num_classes=num_classes
        )  # keeps its fusion variant and input normalisation
    model = BiSeNetV1(config)
    if source is not None:
        state = source.state_dict()
        if (
            source.config.num_classes != num_classes
        ):  # fine-tuning on other classes: everything but the classifiers
            state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIERS)}
            log(
                f"{load_from}: {source.config.num_classes} classes, the data has {num_classes}: the three classifier layers are re-initialised"
            )
        model.load_state_dict(state, strict=source.config.num_classes == num_classes)
        log(f"initial weights from {load_from}")
    if pretrained:
        load_backbone(model, pretrained, log=log)
    if sync_bn and runtime.distributed:
        if runtime.backend == "gloo":
            raise cli.UsageError("--sync-bn needs nccl or hccl; gloo (CPU) has no SyncBatchNorm")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(
        runtime.device,
        memory_format=torch.channels_last if channels_last else torch.preserve_format,
    )


def data_parallel(model, runtime):
    """Buffers stay per rank, as in Ascend's port and mmengine; validation first shares rank 0's (share_buffers)."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=runtime.ddp_device_ids, broadcast_buffers=False
    )


def train_step(model, optimizer, *, scaler, images, labels, loss_fn, autocast):
    """One SGD step. loss_fn(outputs, labels) -> loss; autocast() -> the precision context (Runtime.autocast)."""
    with autocast():
        outputs = model(images)
    loss = loss_fn(outputs, labels)
    optimizer.zero_grad()  # each optimizer's default: torch's frees the gradients, NpuFusedSGD zeroes its combined buffer
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


# -- The loop's periodic work, each a .step(it): progress, validation, checkpoints ---------------------------------
def due(it, interval, iters):
    """Whether the periodic work of 0-based iteration `it` runs: every `interval` iterations and at the end."""
    return (it + 1) % interval == 0 or it + 1 == iters


class RunLog:
    """rank 0's record of a run: messages above the progress bar, JSON lines, TensorBoard scalars if installed."""

    def __init__(self, work_dir, enabled):
        self.enabled, self.path, self.file, self.writer, self.plotter = (
            enabled,
            work_dir / "log.jsonl",
            None,
            None,
            None,
        )

    def start(self, iteration):
        """log.jsonl goes on from `iteration`: what a stopped run logged after its checkpoint goes (the resumed run
        replays those iterations), and so does a last line that a full disk cut short."""
        if not self.enabled:
            return
        try:
            lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            with atomic_write(self.path) as temp:
                temp.write_text(
                    "".join(
                        line
                        for line in lines
                        if line.endswith("\n") and json.loads(line).get("iter", 0) <= iteration
                    )
                )
            self.file = open(self.path, "a")
            from torch.utils.tensorboard import SummaryWriter

            # its writer thread's errors (a full disk) come back through record(), so their own traceback is left out
            threading.excepthook = lambda hook: (
                None
                if "tensorboard" in type(hook.thread).__module__
                else threading.__excepthook__(hook)
            )
            self.writer = SummaryWriter(str(self.path.parent / "tb"))
        except ImportError:
            self.message(
                "TensorBoard is not installed: scalars go to log.jsonl only (pip install tensorboard)"
            )
        except OSError as e:
            raise self.failed(e) from None

    def message(self, text):
        if self.enabled:
            tqdm.write(text)

    def record(self, entry, **scalars):
        entry = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in entry.items()
        }  # JSON has no NaN
        try:
            if self.file:
                self.file.write(json.dumps(entry) + "\n")
                self.file.flush()
            for name, value in scalars.items() if self.writer else ():
                self.writer.add_scalar(name, value, entry["iter"])
        except OSError as e:
            raise self.failed(e) from None

    def failed(self, error):
        return LogUnwritable(
            f"{self.path.parent}: cannot write the run's log ({error.strerror or error}); free some space"
        )

    def draw(self, *, wait=False):
        """Redraws the run's pictures from log.jsonl (tools/plot_run.py: curves, confusion, per-class IoU) in a process
        of their own, so that training neither waits for matplotlib nor fails with it. At the end (wait) the last
        drawing is waited for, and a failure said."""
        if not self.enabled or (self.plotter and self.plotter.poll() is None and not wait):
            return
        if self.plotter and self.plotter.poll() is None:
            self.plotter.terminate()  # its files are written atomically: the final drawing replaces them all
            self.plotter.wait()
        plot = [
            sys.executable,
            str(Path(__file__).resolve().parent / "tools" / "plot_run.py"),
            str(self.path.parent),
        ]
        self.plotter = subprocess.Popen(
            plot, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if wait and self.plotter.wait():
            said = self.plotter.stderr.read().strip().splitlines() or [
                f"exit code {self.plotter.returncode}"
            ]
            self.message(
                f"warning: the run's pictures were not drawn ({said[-1]}); python tools/plot_run.py {self.path.parent} retries"
            )

    def close(self):
        for handle in (self.file, self.writer):
            if handle:
                handle.close()


class Progress:
    """The progress bar every step, and every `interval` iterations and at the end a log line; training images per
    second and the share of time spent waiting for data, over the steps after the first few (warm-up)."""

    def __init__(self, bar, run_log, *, interval, start, iters, images_per_iter):
        self.bar, self.run_log, self.interval, self.iters, self.images_per_iter = (
            bar,
            run_log,
            interval,
            iters,
            images_per_iter,
        )
        self.first_timed, self.images, self.seconds, self.data_seconds = (
            start + min(10, max((iters - start) // 10, 1)),
            0,
            0.0,
            0.0,
        )

    def step(self, it, *, loss, lr, data_time, step_time):
        if it >= self.first_timed:
            self.images, self.seconds, self.data_seconds = (
                self.images + self.images_per_iter,
                self.seconds + step_time,
                self.data_seconds + data_time,
            )
        self.bar.update()
        if due(it, self.interval, self.iters):
            img_s = self.images / self.seconds if self.seconds else self.images_per_iter / step_time
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
            entry = {
                "iter": it + 1,
                "loss": loss,
                "lr": lr,
                "img_s": img_s,
                "data_wait_s": data_time,
                "step_s": step_time,
            }
            self.run_log.record(entry, **{"train/loss": loss, "train/lr": lr})

    def summary(self):
        if not self.seconds:
            return {"train_fps": None, "data_wait_frac": None}
        return {
            "train_fps": round(self.images / self.seconds, 2),
            "data_wait_frac": round(self.data_seconds / self.seconds, 3),
        }


class Checkpointer:
    """The training loop's checkpoints: iter_N.pth every `interval` iterations and at the end, latest.pth pointed at
    it, old ones pruned to `keep`; only rank 0 writes. `best`: the best val mIoU so far."""

    def __init__(
        self,
        work_dir,
        model,
        *,
        contents,
        interval,
        iters,
        keep,
        is_main,
        log,
        path=None,
        best=None,
    ):
        self.work_dir, self.model, self.contents, self.interval, self.iters, self.keep = (
            work_dir,
            model,
            contents,
            interval,
            iters,
            keep,
        )
        self.is_main, self.log, self.best = is_main, log, best
        self.path = (
            path  # the newest iteration checkpoint: the resumed one until this run writes its own
        )

    def save(self, path, iteration):
        if self.is_main:
            save_checkpoint(path, self.model, iteration=iteration, best=self.best, **self.contents)

    def step(self, it, *, now=False):
        if (
            not (now or due(it, self.interval, self.iters))
            or self.path == self.work_dir / f"iter_{it + 1}.pth"
        ):
            return
        self.path = self.work_dir / f"iter_{it + 1}.pth"
        self.save(self.path, it + 1)
        if self.is_main:
            point_latest(self.work_dir, self.path)
            for old in prune(self.work_dir, self.keep):
                self.log(f"removed {old.name} (--keep-checkpoints {self.keep})")


class Preemption:
    """SIGTERM (what SLURM, Kubernetes and spot instances send before SIGKILL) and SIGUSR1 (SLURM's --signal) stop the
    run: every rank finishes its step, they agree on the iteration, rank 0 saves it, and the run ends (Stopped)."""

    def __init__(self, runtime, checkpointer):
        self.runtime, self.checkpointer, self.signum = runtime, checkpointer, None
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, lambda signum, _frame: setattr(self, "signum", signum))

    def step(self, it):
        if self.runtime.any_rank(self.signum is not None):
            self.checkpointer.step(it, now=True)
            signum = self.signum or signal.SIGTERM  # another rank's signal
            if not self.runtime.is_main:
                sys.exit(128 + signum)  # rank 0 says it, once
            resume = "run the same command with --resume (the launch scripts do) to continue"
            raise Stopped(
                f"stopped by {signal.Signals(signum).name} after iteration {it + 1}; saved {self.checkpointer.path}; {resume}",
                signum,
            )


class Validation:
    """val mIoU every `interval` iterations and at the end, with rank 0's BatchNorm statistics; a new best is saved
    as best.pth. Without a val set (--no-validate) it never runs."""

    def __init__(
        self, val_set, model, *, runtime, amp, workers, interval, iters, best, run_log, checkpointer
    ):
        self.val_set, self.model, self.runtime, self.amp, self.workers = (
            val_set,
            model,
            runtime,
            amp,
            workers,
        )
        self.interval, self.iters, self.best, self.run_log, self.checkpointer, self.result = (
            interval,
            iters,
            best,
            run_log,
            checkpointer,
            None,
        )

    def step(self, it):
        if self.val_set is None or not due(it, self.interval, self.iters):
            return
        self.runtime.share_buffers(self.model)
        self.model.eval()
        self.result = evaluate(
            torch_segmenter(self.model, self.runtime, amp=self.amp),
            self.val_set,
            runtime=self.runtime,
            workers=self.workers,
        )
        self.model.train()
        miou = self.result["mIoU"]
        improved = math.isfinite(miou) and (self.best is None or miou > self.best)
        self.best = self.checkpointer.best = miou if improved else self.best
        shown = (
            f"{miou:.2f} (ss whole)"
            if math.isfinite(miou)
            else "undefined: no val pixel is labelled, so it is never a best"
        )
        self.run_log.message(
            f"iter {it + 1}: val mIoU {shown}, {f'best {self.best:.2f}' if self.best is not None else 'no best yet'}"
        )
        per_class = {
            name: None if math.isnan(iou) else 100 * iou
            for name, iou in zip(self.val_set.info.class_names, self.result["iou"])
        }
        scores = {f"val_{key}": self.result[key] for key in ("mIoU", "mDice", "mAcc", "aAcc")}
        self.run_log.record(
            {
                "iter": it + 1,
                **scores,
                "val_iou": per_class,
                "val_confusion": self.result["confusion"],
            },
            **{"val/mIoU": miou},
        )
        self.run_log.draw()
        if improved:
            self.checkpointer.save(self.checkpointer.work_dir / "best.pth", it + 1)


class StepCheck:
    """An fp16 overflow skips the step and lowers the scale (a static --loss-scale is put back); a non-finite loss
    anywhere else, or a scale below 1, ends the run with the last good checkpoint kept."""

    def __init__(self, scaler, *, static_scale, run_log, work_dir):
        self.scaler, self.static_scale, self.run_log, self.work_dir, self.scale_before = (
            scaler,
            static_scale,
            run_log,
            work_dir,
            scaler.get_scale(),
        )
        self.unlabelled = (
            0  # batches without a labelled pixel: they train nothing (loss 0), and are counted
        )

    def step(self, it, loss, labels):
        if not (labels != IGNORE_INDEX).any():
            self.unlabelled += 1
            self.run_log.record(
                {"iter": it + 1, "unlabelled_batch": True, "unlabelled_batches": self.unlabelled}
            )
        scale_before, self.scale_before = self.scale_before, self.scaler.get_scale()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            if self.static_scale:
                self.scaler.update(float(self.static_scale))
            scale = self.scale_before = self.scaler.get_scale()
            self.run_log.message(
                f"iter {it + 1}: fp16 gradients overflowed, step skipped, loss scale {scale_before:g} -> {scale:g}"
            )
            self.run_log.record({"iter": it + 1, "overflow": True, "loss_scale": scale})
            if scale < 1:
                fix = f"lower --lr, or use --amp-dtype bfloat16 or --amp O0. {last_checkpoint_note(self.work_dir)}"
                raise TrainingError(
                    f"the fp16 loss scale fell to {scale:g} at iteration {it + 1}: gradients overflow at any scale, so training diverged; {fix}"
                )
        elif not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at iteration {it + 1}; lower --lr or check the data. {last_checkpoint_note(self.work_dir)}"
            )


# -- Building a run, then running it --------------------------------------------------------------------------
def setting_text(value):
    if isinstance(value, (tuple, list)):
        return ("x" if all(isinstance(v, int) for v in value) else ",").join(
            f"{v:g}" if isinstance(v, float) else str(v) for v in value
        )
    return f"{value:g}" if isinstance(value, float) else str(value)


def changed_settings(saved, current):
    """'--lr 0.01 (was 0.02), ...': the recipe flags of this command that differ from those of the resumed run."""
    changes = []
    for name in [*RECIPE_FLAGS, "world_size", "data_root"]:
        if name in saved and setting_text(saved[name]) != setting_text(current[name]):
            flag = "world size" if name == "world_size" else "--" + name.replace("_", "-")
            changes.append(
                f"{flag} {setting_text(current[name])} (was {setting_text(saved[name])})"
            )
    return ", ".join(changes)


def build_runtime(args):
    """The device, checked against the flags before anything is loaded."""
    runtime = setup_runtime(args.device, args.device_id, amp_dtype=args.amp_dtype)
    if runtime.is_main:
        tqdm.write(runtime.device_note)
    runtime.check_options(compile=args.compile, channels_last=args.channels_last)
    if args.loss_scale and not runtime.grad_scaler(args.amp).is_enabled():
        precision = runtime.precision(args.amp)
        raise cli.UsageError(
            f"--loss-scale {args.loss_scale:g}: this run computes in {precision}, which has no loss scaling; leave --loss-scale out"
        )
    if args.batch_size < 2 and not (args.sync_bn and runtime.distributed):
        fix = "use --batch-size >= 2 (or --sync-bn on several devices)"
        raise cli.UsageError(
            f"--batch-size 1: BatchNorm on the 1x1 pooled attention maps needs at least 2 images per device; {fix}"
        )
    return runtime


def build_data(args):
    """(training set, val set or None); the data's classes are the model's."""
    transform = TrainTransform(args.crop, args.scale_range, cat_max_ratio=args.cat_max_ratio)
    dataset, (crop, largest) = (
        open_dataset(args.data_root, "train", dataset_type=args.dataset, transform=transform),
        (args.crop, args.scale_range[1]),
    )
    height, width = read_image(dataset.samples[0][0]).shape[:2]
    if crop[0] > height * largest or crop[1] > width * largest:
        raise cli.UsageError(
            f"--crop {crop[0]}x{crop[1]} is larger than the {height}x{width} images even at the largest scale {largest:g}; use a smaller --crop"
        )
    info = dataset.info
    if args.num_classes is not None and args.num_classes != info.num_classes:
        raise cli.UsageError(
            f"--num-classes {args.num_classes}: {args.data_root} ({info.name}) has {info.num_classes} classes; leave --num-classes out"
        )
    return dataset, None if args.no_validate else open_dataset(
        args.data_root, "val", dataset_type=args.dataset
    )


def check_labels(dataset, work_dir, run_log, *, source, layout, processes):
    """Says what the run trains on; on rank 0 returns the training labels' pixels per label value (read once in
    `processes` processes, cached in work_dir while the label files are unchanged). A 2-class set whose labels hold
    only 0 and 255 is refused: 255 is ignored, so class 1 would never be trained nor scored. An absent class warns."""
    info, cache = dataset.info, work_dir / "label_histogram.json"
    run_log.message(
        f"dataset: {info.name} ({layout}), {info.num_classes} classes, {len(dataset)} training images"
    )
    if not run_log.enabled:
        return None
    files = "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for _, p in dataset.samples)
    key, saved = (
        hashlib.sha256(files.encode()).hexdigest(),
        json.loads(cache.read_text()) if cache.is_file() else {},
    )
    counts = np.array(saved["pixels"], dtype=np.int64) if saved.get("key") == key else None
    if counts is None:
        started, counts = time.perf_counter(), label_histogram(dataset, processes)
        with (
            contextlib.suppress(OSError),
            atomic_write(cache) as temp,
        ):  # only a cache: a full disk is said at the log's first line
            temp.write_text(json.dumps({"key": key, "pixels": counts.tolist()}))
        run_log.message(
            f"label histogram of {len(dataset)} labels: {time.perf_counter() - started:.1f} s in {processes} processes, cached in {cache.name}"
        )
    if info.num_classes == 2 and not counts[1:IGNORE_INDEX].any() and counts[IGNORE_INDEX]:
        fix = f"if 255 marks your foreground, write it as 1 into a copy: python tools/map_labels.py {source} NEW_ROOT --map 255=1"
        raise DataError(
            f"{source}: the training labels hold only 0 and 255, and 255 is the ignore value, so {info.class_names[1]!r} never occurs; {fix}"
        )
    absent = [name for name, count in zip(info.class_names, counts) if count == 0]
    if absent:
        run_log.message(
            f"warning: {len(absent)} of {info.num_classes} classes never occur in the training labels: {', '.join(absent)}; "
            f"check the class list and label values (python tools/check_dataset.py {source})"
        )
    return counts


def class_weights(spec, counts, *, num_classes, runtime):
    """--class-weight as a tensor on the device, or None: a text file of one weight per class, or auto: ENet's
    1 / ln(1.02 + p) of each class's share p of the labelled training pixels (rank 0's histogram, sent to all)."""
    if spec is None:
        return None
    if spec != "auto":
        try:
            weights = torch.tensor(
                [float(v) for v in Path(spec).read_text().replace(",", " ").split()]
            )
        except (OSError, ValueError) as e:
            raise cli.UsageError(
                f"--class-weight {spec}: cannot read it ({cli.first_line(e)}); pass a text file of {num_classes} numbers, or auto"
            ) from None
        if len(weights) != num_classes or not (
            torch.isfinite(weights).all() and (weights >= 0).all() and weights.any()
        ):
            raise cli.UsageError(
                f"--class-weight {spec}: expected {num_classes} finite weights >= 0, not all 0 (one per class); got {len(weights)} values"
            )
        return weights.to(runtime.device)
    shares = (
        torch.zeros(num_classes)
        if counts is None
        else torch.from_numpy(counts[:num_classes] / max(counts[:num_classes].sum(), 1)).float()
    )
    return runtime.broadcast(1 / torch.log(1.02 + shares))


def build_objective(args, dataset, work_dir, run_log, runtime):
    """(loss function, learning-rate schedule, class weights or None), after the training labels are checked."""
    layout, processes = detect_dataset(args.data_root, args.dataset), max(args.workers, 1)
    counts = check_labels(
        dataset, work_dir, run_log, source=args.data_root, layout=layout, processes=processes
    )
    weights = class_weights(
        args.class_weight, counts, num_classes=dataset.info.num_classes, runtime=runtime
    )
    loss_fn = functools.partial(
        segmentation_loss,
        loss_type=args.loss,
        ohem_thresh=args.ohem_thresh,
        aux_weight=args.aux_weight,
        normalise=args.loss_normalise,
        class_weight=weights,
    )
    schedule = functools.partial(
        learning_rate,
        base_lr=args.lr,
        iters=args.iters,
        min_lr=args.min_lr,
        power=args.poly_power,
        warmup_iters=args.warmup_iters,
        warmup=args.warmup,
        warmup_ratio=args.warmup_ratio,
        schedule=args.lr_schedule,
    )
    return loss_fn, schedule, weights


def build_model_and_state(args, runtime, *, info, channels_last, checkpoint, resumed_from, run_log):
    """(model, optimizer, scaler, first iteration, best mIoU): fresh, or as the resumed checkpoint left them."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    model = create_model(
        runtime,
        depth=args.depth,
        num_classes=info.num_classes,
        dropout=args.dropout,
        channels_last=channels_last,
        load_from=args.load_from,
        pretrained=args.pretrained,
        sync_bn=args.sync_bn,
        log=run_log.message,
    )
    optimizer = sgd(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        kernel=runtime.sgd_kernel,
    )
    scaler = runtime.grad_scaler(args.amp, args.loss_scale)
    start, best = 0, None
    if checkpoint is not None:
        start, best = restore(
            checkpoint,
            resumed_from,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            runtime=runtime,
            info=info,
        )
        best = (
            best if best is not None and math.isfinite(best) else None
        )  # earlier versions could save a NaN best
        if start > args.iters:
            raise cli.UsageError(
                f"--iters {args.iters}: the run in {args.work_dir} is at iteration {start} already; pass --iters above {start} to train on"
            )
        run_log.message(
            f"resumed from {resumed_from.resolve()} at iteration {start}"
            + (": it is complete, nothing to train" if start == args.iters else "")
        )
        changes = changed_settings(
            checkpoint.get("args", {}), {**vars(args), "world_size": runtime.world_size}
        )
        if changes:
            run_log.message(
                f"warning: resuming with settings that differ from the run's: {changes}"
            )
    for group in (
        optimizer.param_groups
    ):  # a resumed run takes this command's values, not its optimizer state's
        group.update(momentum=args.momentum, weight_decay=args.weight_decay)
    return model, optimizer, scaler, start, best


def seed_for(seed, diff_seed, *, rank, iteration):
    """Torch's RNG (dropout) is reseeded from (seed, rank, iteration) before every step, so a run resumed from any
    iteration (a periodic checkpoint, or one saved on SIGTERM) continues exactly, on any world size."""
    return (seed * 1000003 + (rank if diff_seed else 0) * 7919 + iteration) % 2**63


def finish(runtime, *, args, hooks, run_log, held_lock):
    """The JSON line a run ends with (hooks: progress, validation, checkpointer, step check), then the log, the process
    group and the work dir's lock are released."""
    progress, validation, checkpointer, step_check = hooks
    result, best, checkpoint = validation.result, validation.best, checkpointer.path
    summary = {
        "iters": args.iters,
        **progress.summary(),
        "mIoU": round(result["mIoU"], 2) if result and math.isfinite(result["mIoU"]) else None,
    }
    summary |= {
        "best_mIoU": round(best, 2) if best is not None else None,
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
    }
    summary |= {
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "backend": runtime.backend,
        "amp": args.amp,
    }
    summary |= {
        "precision": runtime.precision(args.amp),
        "depth": args.depth,
        "unlabelled_batches": step_check.unlabelled,
    }
    run_log.record({"iter": args.iters, "summary": summary})
    run_log.draw(wait=True)
    run_log.close()
    if runtime.is_main:
        print(json.dumps(summary), flush=True)
    teardown_runtime(runtime)
    if held_lock:
        held_lock.close()
    return summary


def train(args):
    """Builds everything (runtime, data, work dir, model, the loop's periodic work), then runs the loop."""
    runtime = build_runtime(args)
    dataset, val_set = build_data(args)
    work_dir, info = Path(args.work_dir), dataset.info
    held_lock, checkpoint, resumed_from = open_work_dir(
        work_dir, args.resume, runtime=runtime, log=tqdm.write
    )
    run_log = RunLog(work_dir, runtime.is_main)
    loss_fn, schedule, weights = build_objective(args, dataset, work_dir, run_log, runtime)
    run_log.message(runtime.precision_note(args.amp))
    channels_last = (
        runtime.prefers_channels_last if args.channels_last is None else args.channels_last
    )
    model, optimizer, scaler, start, best = build_model_and_state(
        args,
        runtime,
        info=info,
        channels_last=channels_last,
        checkpoint=checkpoint,
        resumed_from=resumed_from,
        run_log=run_log,
    )
    del checkpoint
    run_log.start(start)
    stepped = data_parallel(model, runtime) if runtime.distributed else model
    stepped = torch.compile(stepped) if args.compile else stepped
    loader = training_loader(
        dataset,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
        start=start,
        iters=args.iters,
        runtime=runtime,
    )
    settings = {
        **vars(args),
        "world_size": runtime.world_size,
        "class_weights": None if weights is None else weights.tolist(),
    }
    contents = dict(
        optimizer=optimizer, scaler=scaler, settings=settings, dataset=info
    )  # besides the model
    checkpointer = Checkpointer(
        work_dir,
        model,
        contents=contents,
        interval=args.ckpt_interval,
        iters=args.iters,
        keep=args.keep_checkpoints,
        is_main=runtime.is_main,
        log=run_log.message,
        path=resumed_from,
        best=best,
    )
    validation = Validation(
        val_set,
        model,
        runtime=runtime,
        amp=args.amp,
        workers=min(args.workers, 2),
        interval=args.val_interval,
        iters=args.iters,
        best=best,
        run_log=run_log,
        checkpointer=checkpointer,
    )
    step_check, preemption = (
        StepCheck(scaler, static_scale=args.loss_scale, run_log=run_log, work_dir=work_dir),
        Preemption(runtime, checkpointer),
    )
    autocast, it = functools.partial(runtime.autocast, args.amp), start
    try:
        with tqdm(
            total=args.iters,
            initial=start,
            disable=not runtime.is_main,
            dynamic_ncols=True,
            desc="train",
        ) as bar:
            progress = Progress(
                bar,
                run_log,
                interval=args.log_interval,
                start=start,
                iters=args.iters,
                images_per_iter=args.batch_size * runtime.world_size,
            )
            tick = time.perf_counter()
            for it, batch in enumerate(loader, start):
                data_time, lr = time.perf_counter() - tick, schedule(it)
                torch.manual_seed(
                    seed_for(args.seed, args.diff_seed, rank=runtime.rank, iteration=it)
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch["image"].to(runtime.device, non_blocking=True)
                images = (
                    images.contiguous(memory_format=torch.channels_last)
                    if channels_last
                    else images
                )
                labels = batch["label"].to(runtime.device, non_blocking=True).long()
                loss = train_step(
                    stepped,
                    optimizer,
                    scaler=scaler,
                    images=images,
                    labels=labels,
                    loss_fn=loss_fn,
                    autocast=autocast,
                ).item()
                step_check.step(it, loss, labels)
                progress.step(
                    it, loss=loss, lr=lr, data_time=data_time, step_time=time.perf_counter() - tick
                )
                validation.step(it)
                checkpointer.step(it)
                preemption.step(it)
                tick = time.perf_counter()
    except RuntimeError:  # a collective broken by a peer that the launcher stopped first, which said why: leave quietly
        if preemption.signum and runtime.distributed:
            sys.exit(128 + preemption.signum)
        raise
    except LogUnwritable as e:
        with contextlib.suppress(
            cli.Error, OSError
        ):  # no room for it either: the last checkpoint stays the resume point
            checkpointer.step(it, now=True)
        raise TrainingError(
            f"{e}, then run the same command with --resume. {last_checkpoint_note(work_dir)}"
        ) from None
    except KeyboardInterrupt:
        resume = f"{last_checkpoint_note(work_dir)} Run the same command with --resume to continue."
        raise Stopped(f"interrupted at iteration {it + 1}; {resume}", signal.SIGINT) from None
    return finish(
        runtime,
        args=args,
        hooks=(progress, validation, checkpointer, step_check),
        run_log=run_log,
        held_lock=held_lock,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.print_recipe:  # what the launch scripts show with DRY_RUN=1
        print(
            json.dumps(
                {
                    "recipe": args.recipe,
                    **{
                        name: getattr(args, name)
                        for name in RECIPES[args.recipe]
                        if name != "scale"
                    },
                }
            )
        )
        return
    try:
        cli.main(train, args)
    except SystemExit as e:  # under run_8p.sh an error that a restart would repeat (bad data, a flag) ends the group instead
        if e.code == 2 and (launcher := os.environ.get("BISENET_LAUNCHER_PID")):
            signal.signal(
                signal.SIGTERM, lambda *_: time.sleep(1) or sys.exit(2)
            )  # leaves just after the launcher signalled every rank
            os.kill(int(launcher), signal.SIGUSR2)
            time.sleep(60)
        raise
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
