"""Train BiSeNetV1 on Cityscapes. Defaults reproduce the Ascend ModelZoo / mmseg recipe for one device of the
8 x 8 images run (R50 context path from scratch, SGD lr 0.2 for 64 images, 40k iterations, poly, AMP O1).

    python train.py --data-root data/cityscapes                           # one device
    torchrun --nproc-per-node 8 train.py --lr 0.2 ...                     # DDP; backend from DIST_BACKEND
    python benchmark.py                                                   # speed of this recipe on this device

A run ends with one JSON line: {"iters", "train_fps", "mIoU", "checkpoint", ...}.
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cli
from bisenet import RESNET_LAYOUTS, ModelConfig, build_model
from checkpoints import Checkpointer, changed_settings, last_checkpoint_note, load_backbone, load_model, open_work_dir, restore
from cityscapes import IGNORE_INDEX
from cli import CheckpointError
from datasets import DataError, TrainTransform, detect_dataset, open_dataset
from device import setup_runtime, sgd, teardown_runtime
from evaluate import evaluate, torch_segmenter
from runlog import Progress, RunLog, Speed


class TrainingError(cli.Error):
    """Training cannot go on (e.g. a non-finite loss in fp32). The message says where and what to do."""


class Interrupted(TrainingError):
    """Ctrl-C: the run stops cleanly and resumes from its last checkpoint."""

    exit_code = 130


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--data-root", default="data/cityscapes")
    p.add_argument("--dataset", default="auto", choices=("auto", "cityscapes", "folder"), help="auto: from the data root (see README: Your own data)")
    p.add_argument("--work-dir", default="work_dirs/bisenetv1")
    p.add_argument("--depth", type=int, default=50, choices=sorted(RESNET_LAYOUTS), help="ResNet context path")
    p.add_argument("--num-classes", type=cli.integer(2, 255), help="a check: the class count comes from the dataset (Cityscapes 19, classes.txt)")
    p.add_argument("--dropout", type=cli.real(0, 1, high_open=True), default=0.1, help="before each head's classifier (mmseg)")
    p.add_argument("--batch-size", type=cli.integer(1), default=8, help="images per device")
    p.add_argument("--crop", type=cli.size, default="1024x1024", help="HxW")
    p.add_argument("--scale-range", type=cli.ratios(2), default="0.5,2.0", help="random rescale ratio range")
    p.add_argument("--cat-max-ratio", type=cli.real(0, 1, low_open=True), default=0.75)
    p.add_argument("--iters", type=cli.integer(1), default=40000)
    p.add_argument("--lr", type=cli.real(0, 1e38, low_open=True), default=0.025, help="0.2 for 8 devices x 8 images (Ascend ModelZoo); scale linearly")
    p.add_argument("--momentum", type=cli.real(0, 1), default=0.9)
    p.add_argument("--weight-decay", type=cli.real(0), default=5e-4)
    p.add_argument("--warmup-iters", type=cli.integer(0), default=1000)
    p.add_argument("--warmup", default="linear", choices=("linear", "exp"))
    p.add_argument("--warmup-ratio", type=cli.real(0, 1, low_open=True), default=0.1)
    p.add_argument("--poly-power", type=cli.real(0), default=0.9)
    p.add_argument("--min-lr", type=cli.real(0), default=1e-4)
    p.add_argument("--loss", default="ce", choices=("ce", "ohem"))
    p.add_argument("--ohem-thresh", type=cli.real(0, 1, low_open=True), default=0.7)
    p.add_argument("--aux-weight", type=cli.real(0), default=1.0)
    p.add_argument(
        "--loss-normalise",
        default="valid",
        choices=("valid", "all"),
        help="CE divides by the labelled pixels (valid: PyTorch's, CoinCheung's) or by all pixels (all: mmseg's avg_non_ignore=False, the seed's)",
    )
    p.add_argument(
        "--amp",
        "--opt-level",
        dest="amp",
        default="O1",
        choices=("O0", "O1"),
        help="O1 = apex O1: convolutions in half precision (--amp-dtype), weights and loss in fp32; O0 = fp32",
    )
    p.add_argument(
        "--amp-dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16"),
        help="O1's half precision. auto: float16 with dynamic loss scaling on CUDA and Ascend (what apex O1 did); on a CPU bfloat16 where it has "
        "AMX-BF16 or AVX512-BF16, else fp32 (printed at start); bfloat16 needs no loss scaling",
    )
    p.add_argument(
        "--loss-scale",
        type=cli.real(0, low_open=True),
        help="fp16 only: a static loss scale, e.g. 128 as Ascend's port (apex loss_scale=128.0); default: dynamic (from 2^16, halved on overflow)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "npu"), help="auto: an Ascend NPU, else a CUDA GPU, else the CPU")
    p.add_argument("--device-id", "--gpu-id", dest="device_id", type=cli.integer(0), default=0, help="single-device runs")
    p.add_argument("--load-from", help="initial weights: any checkpoint bisenet.load_model reads")
    p.add_argument("--pretrained", help="ImageNet ResNet weights (torchvision format), path or URL")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir from its newest checkpoint, if it has one")
    p.add_argument("--keep-checkpoints", type=cli.integer(0), default=0, help="keep only the newest N iter_N.pth (0: all); best.pth is always kept")
    p.add_argument("--seed", type=cli.integer(0), default=36436756)
    p.add_argument("--diff-seed", "--diff_seed", dest="diff_seed", action="store_true", help="different dropout seed per rank")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--val-interval", type=cli.integer(1), default=4000)
    p.add_argument("--ckpt-interval", type=cli.integer(1), default=4000)
    p.add_argument("--log-interval", type=cli.integer(1), default=50)
    p.add_argument("--workers", type=cli.integer(0), default=4, help="data loading processes per device")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA and AVX-512 CPUs, off for AVX2 CPUs and Ascend"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training model (compiling takes minutes; see the README's measurements)")
    args = p.parse_args(argv)
    if args.scale_range[0] > args.scale_range[1]:
        p.error(f"argument --scale-range: {args.scale_range[0]:g},{args.scale_range[1]:g}: the smaller ratio comes first, e.g. 0.5,2.0")
    if args.loss == "ohem" and args.loss_normalise != "valid":
        p.error("argument --loss-normalise: OHEM averages over the hard pixels it keeps; --loss-normalise applies to --loss ce")
    if args.min_lr > args.lr:
        p.error(f"argument --min-lr: {args.min_lr:g} is above --lr {args.lr:g}; the poly schedule decays from --lr to --min-lr")
    return args


# -- Schedule and loss ----------------------------------------------------------------------------------------
def learning_rate(it, *, base_lr, iters, min_lr=1e-4, power=0.9, warmup_iters=0, warmup="linear", warmup_ratio=0.1):
    """mmcv's poly schedule with warmup, at 0-based iteration `it`; bind the numbers with functools.partial."""
    lr = (base_lr - min_lr) * (1 - it / iters) ** power + min_lr
    if it < warmup_iters:
        if warmup == "linear":
            lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
        else:
            lr *= warmup_ratio ** (1 - it / warmup_iters)
    return lr


def ohem_cross_entropy(logits, labels, *, thresh):
    """CoinCheung's OHEM: mean loss of pixels harder than -log(thresh), at least valid/16 of them."""
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    n_min = int((labels != IGNORE_INDEX).sum()) // 16
    hard = loss[loss > -math.log(thresh)]
    if hard.numel() < n_min:
        hard = loss.topk(n_min).values
    return hard.mean()


def cross_entropy(logits, labels, *, normalise="valid"):
    """Mean CE over the labelled pixels (valid), or the sum over them divided by all pixels, ignored ones included
    (all: mmseg's CrossEntropyLoss with avg_non_ignore=False, which scales the loss by the labelled fraction)."""
    if normalise == "valid":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labels.numel()


def segmentation_loss(outputs, labels, *, loss_type="ce", ohem_thresh=0.7, aux_weight=1.0, normalise="valid"):
    """Main head + aux_weight x each aux head, on the fp32 logits the heads return (O1's loss in fp32); bind the
    options with functools.partial to get the loss callable."""

    def head_loss(logits):
        if loss_type == "ohem":
            return ohem_cross_entropy(logits, labels, thresh=ohem_thresh)
        return cross_entropy(logits, labels, normalise=normalise)

    main, *aux = outputs
    return head_loss(main) + aux_weight * sum(head_loss(a) for a in aux)


# -- Data -----------------------------------------------------------------------------------------------------
class IterationSampler(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for iterations start..iters-1.

    Epoch e is a permutation seeded by (seed, e); iteration i of rank r takes its own slice of it (disjoint across
    ranks, drop_last). Augmentation seeds are (seed, iteration, rank, slot): nothing depends on worker processes,
    so a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, size, *, batch_size, rank, world_size, seed, start, iters):
        self.per_epoch = size // (batch_size * world_size)
        if self.per_epoch == 0:
            raise cli.UsageError(f"{size} training images cannot fill one batch of {batch_size} x {world_size} devices; lower --batch-size")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start, self.iters = seed, start, iters

    def __len__(self):
        return self.iters - self.start

    def __iter__(self):
        epoch, order = None, None
        for it in range(self.start, self.iters):
            if it // self.per_epoch != epoch:
                epoch = it // self.per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()
            first = ((it % self.per_epoch) * self.world_size + self.rank) * self.batch_size
            yield [(order[first + k], (self.seed, it, self.rank, k)) for k in range(self.batch_size)]


def training_set(data_root, dataset_type, *, crop, scale_range, cat_max_ratio):
    dataset = open_dataset(data_root, "train", dataset_type=dataset_type, transform=TrainTransform(crop, scale_range, cat_max_ratio=cat_max_ratio))
    first = dataset.samples[0][0]
    try:
        with Image.open(first) as image:
            width, height = image.size
    except OSError as e:
        raise DataError(f"{first}: unreadable image ({type(e).__name__}); re-extract or re-download this file") from None
    largest = scale_range[1]
    if crop[0] > height * largest or crop[1] > width * largest:
        raise cli.UsageError(
            f"--crop {crop[0]}x{crop[1]} is larger than the {height}x{width} images even at the largest scale {largest:g}; use a smaller --crop"
        )
    return dataset


def training_loader(dataset, *, batch_size, workers, seed, start, iters, runtime):
    sampler = IterationSampler(len(dataset), batch_size=batch_size, rank=runtime.rank, world_size=runtime.world_size, seed=seed, start=start, iters=iters)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=runtime.pin_memory,
        pin_memory_device=runtime.pin_memory_device,
        persistent_workers=False,  # one pass over all iterations: the workers live for the whole run anyway
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator(),  # keeps the loader off the global RNG that dropout draws from
    )


# -- Checkpoints ----------------------------------------------------------------------------------------------
def seed_for(seed, diff_seed, *, rank, iteration):
    """Torch's RNG (dropout) is reseeded from (seed, rank, iteration) at the start and after every checkpoint,
    so every rank's RNG state is implied by the checkpoint's iteration and resume is exact on any world size."""
    return (seed * 1000003 + (rank if diff_seed else 0) * 7919 + iteration) % 2**63


# -- Model ----------------------------------------------------------------------------------------------------
CLASSIFIERS = ("head.classifier.", "aux_head16.classifier.", "aux_head32.classifier.")


def create_model(runtime, *, depth, num_classes, dropout, channels_last, load_from=None, pretrained=None, sync_bn=False, log=print):
    config = ModelConfig(depth, num_classes, dropout=dropout)
    source = None
    if load_from:
        source = load_model(load_from)
        if source.config.depth != depth:
            raise CheckpointError(f"{load_from}: a ResNet-{source.config.depth} model; pass --depth {source.config.depth}")
        config = dataclasses.replace(source.config, dropout=dropout, num_classes=num_classes)  # keeps its fusion variant and input normalisation
    model = build_model(config)
    if source is not None:
        state = source.state_dict()
        if source.config.num_classes != num_classes:  # fine-tuning on other classes: everything but the classifiers
            state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIERS)}
            log(f"{load_from}: {source.config.num_classes} classes, the data has {num_classes}: the three classifier layers are re-initialised")
        model.load_state_dict(state, strict=source.config.num_classes == num_classes)
        log(f"initial weights from {load_from}")
    if pretrained:
        load_backbone(model, pretrained, log=log)
    if sync_bn and runtime.distributed:
        if runtime.backend == "gloo":
            raise cli.UsageError("--sync-bn needs nccl or hccl; gloo (CPU) has no SyncBatchNorm")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def create_optimizer(model, *, lr, momentum, weight_decay, kernel="default"):
    return sgd(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, kernel=kernel)


def data_parallel(model, runtime):
    """Buffers stay per rank, as in Ascend's port and mmengine (no BatchNorm broadcast every step); validation
    first shares rank 0's (Runtime.share_buffers)."""
    return nn.parallel.DistributedDataParallel(model, device_ids=runtime.ddp_device_ids, broadcast_buffers=False)


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


def to_device(batch, runtime, *, channels_last):
    images = batch["image"].to(runtime.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["label"].to(runtime.device, non_blocking=True).long()


# -- The run --------------------------------------------------------------------------------------------------
class Validation:
    """val mIoU every `interval` iterations and at the end, with rank 0's BatchNorm statistics; step() says whether
    it is a new best. Without a val set (--no-validate) it never runs."""

    def __init__(self, val_set, model, *, runtime, amp, workers, interval, iters, best, run_log):
        self.val_set, self.model, self.runtime, self.amp, self.workers = val_set, model, runtime, amp, workers
        self.interval, self.iters, self.best, self.run_log, self.result = interval, iters, best, run_log, None

    def step(self, it):
        if self.val_set is None or ((it + 1) % self.interval and it + 1 != self.iters):
            return False
        self.runtime.share_buffers(self.model)
        self.model.eval()
        self.result = evaluate(torch_segmenter(self.model, self.runtime, amp=self.amp), self.val_set, runtime=self.runtime, workers=self.workers)
        self.model.train()
        miou = self.result["mIoU"]
        improved = self.best is None or miou > self.best
        self.best = miou if improved else self.best
        self.run_log.message(f"iter {it + 1}: val mIoU {miou:.2f} (ss whole), best {self.best:.2f}")
        self.run_log.record({"iter": it + 1, "val_mIoU": miou, "val_mAcc": self.result["mAcc"], "val_aAcc": self.result["aAcc"]}, **{"val/mIoU": miou})
        return improved


def check_step(it, loss, *, scaler, scale_before, static_scale, run_log, work_dir):
    """An fp16 overflow skips the step and lowers the scale (a static --loss-scale is put back); a non-finite loss
    anywhere else, or a scale below 1, ends the run with the last good checkpoint kept."""
    if scaler.is_enabled() and scaler.get_scale() < scale_before:
        if static_scale:
            scaler.update(float(static_scale))
        scale = scaler.get_scale()
        run_log.message(f"iter {it + 1}: fp16 gradients overflowed, step skipped, loss scale {scale_before:g} -> {scale:g}")
        run_log.record({"iter": it + 1, "overflow": True, "loss_scale": scale})
        if scale < 1:
            raise TrainingError(
                f"the fp16 loss scale fell to {scale:g} at iteration {it + 1}: gradients overflow at any scale, so training diverged; "
                f"lower --lr, or use --amp-dtype bfloat16 or --amp O0. {last_checkpoint_note(work_dir)}"
            )
    elif not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at iteration {it}; lower --lr or check the data. {last_checkpoint_note(work_dir)}")


def check_flags(runtime, *, loss_scale, amp, batch_size, sync_bn):
    """The flag combinations this runtime cannot train, as one-line errors before anything is loaded."""
    if loss_scale and not runtime.grad_scaler(amp).is_enabled():
        raise cli.UsageError(f"--loss-scale {loss_scale:g}: this run computes in {runtime.precision(amp)}, which has no loss scaling; leave --loss-scale out")
    if batch_size < 2 and not (sync_bn and runtime.distributed):
        raise cli.UsageError(
            "--batch-size 1: BatchNorm on the 1x1 pooled attention maps needs at least 2 images per device; use --batch-size >= 2 (or --sync-bn on several devices)"
        )


def resume(checkpoint, path, *, model, optimizer, scaler, runtime, info, settings, run_log):
    """(start iteration, best mIoU): 0 and None for a fresh run; a resumed run says which recipe flags differ."""
    if checkpoint is None:
        return 0, None
    start, best = restore(checkpoint, path, model=model, optimizer=optimizer, scaler=scaler, runtime=runtime, info=info)
    run_log.message(f"resumed from {path.resolve()} at iteration {start}")
    changes = changed_settings(checkpoint.get("args", {}), settings)
    if changes:
        run_log.message(f"warning: resuming with settings that differ from the run's: {changes}")
    return start, best


def run_summary(runtime, *, iters, amp, depth, speed, validation, checkpoint):
    """The JSON line a run ends with."""
    result, best = validation.result, validation.best
    return {
        "iters": iters,
        **speed.summary(),
        "mIoU": round(result["mIoU"], 2) if result else None,
        "best_mIoU": round(best, 2) if best is not None else None,
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "backend": runtime.backend,
        "amp": amp,
        "precision": runtime.precision(amp),
        "depth": depth,
    }


def train(args):
    runtime = setup_runtime(args.device, args.device_id, amp_dtype=args.amp_dtype)
    if runtime.is_main:
        tqdm.write(runtime.device_note)
    runtime.check_options(compile=args.compile, channels_last=args.channels_last)
    check_flags(runtime, loss_scale=args.loss_scale, amp=args.amp, batch_size=args.batch_size, sync_bn=args.sync_bn)
    channels_last = runtime.prefers_channels_last if args.channels_last is None else args.channels_last
    dataset = training_set(args.data_root, args.dataset, crop=args.crop, scale_range=args.scale_range, cat_max_ratio=args.cat_max_ratio)
    info = dataset.info
    if args.num_classes is not None and args.num_classes != info.num_classes:
        raise cli.UsageError(f"--num-classes {args.num_classes}: {args.data_root} ({info.name}) has {info.num_classes} classes; leave --num-classes out")
    val_set = None if args.no_validate else open_dataset(args.data_root, "val", dataset_type=args.dataset)
    work_dir = Path(args.work_dir)
    held_lock, checkpoint, resumed_from = open_work_dir(work_dir, args.resume, runtime=runtime, log=tqdm.write)
    run_log = RunLog(work_dir, runtime.is_main)
    run_log.message(f"dataset: {info.name} ({detect_dataset(args.data_root, args.dataset)}), {info.num_classes} classes, {len(dataset)} training images")
    run_log.message(runtime.precision_note(args.amp))
    settings = {**vars(args), "world_size": runtime.world_size}

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
    optimizer = create_optimizer(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, kernel=runtime.sgd_kernel)
    scaler = runtime.grad_scaler(args.amp, args.loss_scale)
    start, best = resume(
        checkpoint, resumed_from, model=model, optimizer=optimizer, scaler=scaler, runtime=runtime, info=info, settings=settings, run_log=run_log
    )
    for group in optimizer.param_groups:  # a resumed run takes this command's values, not its optimizer state's
        group.update(momentum=args.momentum, weight_decay=args.weight_decay)
    del checkpoint

    def reseed(iteration):
        torch.manual_seed(seed_for(args.seed, args.diff_seed, rank=runtime.rank, iteration=iteration))

    reseed(start)
    ddp_model = data_parallel(model, runtime) if runtime.distributed else model
    ddp_model = torch.compile(ddp_model) if args.compile else ddp_model
    loss_fn = functools.partial(segmentation_loss, loss_type=args.loss, ohem_thresh=args.ohem_thresh, aux_weight=args.aux_weight, normalise=args.loss_normalise)
    schedule = functools.partial(
        learning_rate,
        base_lr=args.lr,
        iters=args.iters,
        min_lr=args.min_lr,
        power=args.poly_power,
        warmup_iters=args.warmup_iters,
        warmup=args.warmup,
        warmup_ratio=args.warmup_ratio,
    )
    autocast = functools.partial(runtime.autocast, args.amp)
    loader = training_loader(dataset, batch_size=args.batch_size, workers=args.workers, seed=args.seed, start=start, iters=args.iters, runtime=runtime)
    checkpointer = Checkpointer(
        work_dir,
        model,
        optimizer=optimizer,
        scaler=scaler,
        settings=settings,
        dataset=info,
        interval=args.ckpt_interval,
        iters=args.iters,
        keep=args.keep_checkpoints,
        is_main=runtime.is_main,
        reseed=reseed,
        log=run_log.message,
        path=resumed_from,
    )
    validation = Validation(
        val_set, model, runtime=runtime, amp=args.amp, workers=min(args.workers, 2), interval=args.val_interval, iters=args.iters, best=best, run_log=run_log
    )
    speed = Speed(images_per_iter=args.batch_size * runtime.world_size, start=start, iters=args.iters)
    it = start
    ddp_model.train()
    try:
        with tqdm(total=args.iters, initial=start, disable=not runtime.is_main, dynamic_ncols=True, desc="train") as bar:
            progress = Progress(bar, run_log, interval=args.log_interval, iters=args.iters)
            tick = time.perf_counter()
            for it, batch in enumerate(loader, start):
                data_time = time.perf_counter() - tick
                lr = schedule(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, labels = to_device(batch, runtime, channels_last=channels_last)
                scale_before = scaler.get_scale()
                loss = train_step(ddp_model, optimizer, scaler=scaler, images=images, labels=labels, loss_fn=loss_fn, autocast=autocast).item()
                check_step(it, loss, scaler=scaler, scale_before=scale_before, static_scale=args.loss_scale, run_log=run_log, work_dir=work_dir)
                step_time = time.perf_counter() - tick
                speed.step(it, data_time=data_time, step_time=step_time)
                progress.step(it, loss=loss, lr=lr, speed=speed, data_time=data_time, step_time=step_time)
                if validation.step(it):
                    checkpointer.save_best(it, validation.best)
                checkpointer.step(it, validation.best)
                tick = time.perf_counter()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at iteration {it}; {last_checkpoint_note(work_dir)} Run the same command with --resume to continue.") from None
    summary = run_summary(runtime, iters=args.iters, amp=args.amp, depth=args.depth, speed=speed, validation=validation, checkpoint=checkpointer.path)
    run_log.record({"iter": args.iters, "summary": summary})
    run_log.close()
    if runtime.is_main:
        print(json.dumps(summary), flush=True)
    teardown_runtime(runtime)
    if held_lock:
        held_lock.close()
    return summary


def main(argv=None):
    try:
        cli.main(lambda: train(parse_args(argv)))
    except KeyboardInterrupt:
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
