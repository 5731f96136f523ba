"""A training run's work dir, so that no run is ever lost: one training process per work dir (a lock), checkpoints
written atomically, only when there is room, the point to resume from found even when latest.pth is lost or
damaged, never a silent fresh start on an earlier run. (Every file the project writes goes through cli.atomic_write.)

    work_dir/iter_N.pth    a complete training checkpoint after N iterations (model, optimizer, scaler, ...)
    work_dir/latest.pth    a link to the newest iter_N.pth
    work_dir/best.pth      the checkpoint of the best validation mIoU
    work_dir/.lock         held by the training process that uses the work dir
"""

import dataclasses
import errno
import fcntl
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch

import cli
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import CITYSCAPES, NUM_CLASSES
from cli import CheckpointError, atomic_write
from datasets import DatasetInfo, unnamed_classes, voc_palette

TRAINING_KEYS = ("model_config", "model", "optimizer", "scaler", "iteration", "best_miou")
ITERATION_NAME = re.compile(r"^iter_(\d+)\.pth$")
MB = 2**20


class WorkDirError(cli.Error):
    """The work dir cannot be used as asked (in use, not writable, full, holds another run). Nothing was changed."""


def lock(work_dir):
    """Creates work_dir and holds its lock for the life of this process; the kernel drops it when the process dies.

    POSIX record locks (lockf) also hold across machines on NFS with a lock manager. The lock file says who holds it."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        handle = open(work_dir / ".lock", "a+")
    except OSError as e:
        raise WorkDirError(
            f"{work_dir}: cannot write to the work dir ({e.strerror}); pass a writable --work-dir"
        ) from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkDirError(
            f"{work_dir} is in use by {holder}; wait for it to end, or pass another --work-dir"
        ) from None
    handle.truncate(0)  # in append mode the write then starts the file
    handle.write(
        f"train.py pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    return handle


def iteration_checkpoints(work_dir):
    """[(N, path)] of work_dir/iter_N.pth, oldest first."""
    found = [
        (int(m[1]), p) for p in work_dir.glob("iter_*.pth") if (m := ITERATION_NAME.match(p.name))
    ]
    return sorted(found)


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(
        map(
            tensor_bytes,
            obj.values()
            if isinstance(obj, dict)
            else obj
            if isinstance(obj, (list, tuple))
            else (),
        )
    )


def _no_space(directory, needed):
    free = shutil.disk_usage(directory).free
    return WorkDirError(
        f"no space left on {directory} (needs about {needed / MB:.0f} MB, {free / MB:.0f} MB free); free some space and resume"
    )


def caused_by(error, matches):
    """Whether `error` or an error it was raised while handling matches: torch.save reports what went wrong in its
    Python file writes (ENOSPC, Ctrl-C) as a RuntimeError ('unexpected pos') raised during their handling."""
    while error is not None:
        if matches(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj, path):
    """torch.save to a unique temp file, fsync, rename: `path` is the old file or the complete new one, never a part.

    A full disk is reported as such (checked first, and on failure), and the partial temp file is deleted."""
    directory = path.parent
    needed = tensor_bytes(obj) + MB
    if shutil.disk_usage(directory).free < needed:
        raise _no_space(directory, needed)
    try:
        with atomic_write(path) as temp, open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if caused_by(e, lambda error: isinstance(error, KeyboardInterrupt)):
            raise KeyboardInterrupt from None
        if caused_by(
            e, lambda error: getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        ):
            raise _no_space(directory, needed) from None
        if isinstance(e, OSError):
            raise WorkDirError(
                f"{path}: could not write the checkpoint ({e.strerror or e}); the previous checkpoints are kept"
            ) from None
        raise
    fd = os.open(
        directory, os.O_RDONLY
    )  # makes the rename durable: without it a power loss can undo it after the old file went
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_latest(work_dir, target):
    """latest.pth -> target, replaced atomically (a relative link, so the work dir can be moved)."""
    with atomic_write(work_dir / "latest.pth") as temp:
        temp.unlink()  # the unique name stays ours: only this process writes the work dir (lock)
        temp.symlink_to(target.name)


def prune(work_dir, keep):
    """Deletes the oldest iter_N.pth beyond the newest `keep` (0: keep all); latest.pth's target and best.pth stay."""
    if keep <= 0:
        return []
    removed = [path for _, path in iteration_checkpoints(work_dir)[:-keep]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def work_dir_contents(work_dir):
    """What of an earlier run a work dir holds, e.g. 'iter_4.pth, iter_8.pth, best.pth, latest.pth -> iter_8.pth'."""
    names = [path.name for _, path in iteration_checkpoints(work_dir)]
    names += ["best.pth"] if (work_dir / "best.pth").exists() else []
    latest = work_dir / "latest.pth"
    if latest.is_symlink():
        names.append(
            f"latest.pth -> {os.readlink(latest)}{'' if latest.exists() else ' (missing)'}"
        )
    elif latest.exists():
        names.append("latest.pth")
    return ", ".join(names)


def resume_point(work_dir):
    """(checkpoint dict, path, note) to continue the run in work_dir from, or (None, None, None) for an unused one.

    The newest iter_N.pth is the resume point whatever latest.pth says: a run killed between writing iter_N.pth and
    relinking latest.pth, or one that lost latest.pth's target, goes on from its newest complete checkpoint. A
    damaged newest checkpoint stops the run with its name (continuing from an older one would later overwrite it)."""
    saved = iteration_checkpoints(work_dir)
    latest = work_dir / "latest.pth"
    if latest.exists() and not latest.is_symlink():
        found = "directory" if latest.is_dir() else "file"
        raise WorkDirError(
            f"{latest}: expected the link train.py writes, found a {found}; move it out of the work dir and resume"
        )
    if not saved:
        if latest.is_symlink() or (work_dir / "best.pth").exists():
            fix = "pass a new --work-dir, or move those files away to start over"
            raise WorkDirError(
                f"{work_dir} holds a run ({work_dir_contents(work_dir)}) but no iter_N.pth to resume from; {fix}"
            )
        return None, None, None
    _, newest = saved[-1]
    try:
        if newest.is_dir():
            raise CheckpointError(f"{newest}: a directory, not a checkpoint")
        checkpoint = read_checkpoint(newest)
        if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in TRAINING_KEYS):
            raise CheckpointError(
                f"{newest}: not a training checkpoint of train.py (no optimizer state or iteration); to start from its weights use --load-from"
            )
    except CheckpointError as e:
        older = (
            f"move it away to resume from {saved[-2][1].name}"
            if len(saved) > 1
            else "move it away to start over"
        )
        raise WorkDirError(
            f"{e}; the newest checkpoint of the run in {work_dir} is damaged: {older}"
        ) from None
    note = None
    if not latest.is_symlink():
        note = "latest.pth is missing"
    elif os.readlink(latest) != newest.name:
        note = f"latest.pth points to {os.readlink(latest)}{'' if latest.exists() else ', which is missing'}"
    return checkpoint, newest, note


# -- Reading weights: ours, released and ImageNet ones -------------------------------------------------------
def non_finite(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf (one reduction per tensor)."""
    return [
        name
        for name, value in state.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]


def read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix in (".xml", ".bin", ".onnx"):
        raise CheckpointError(
            f"{path}: an exported model, not a PyTorch checkpoint; python tools/deploy.py takes it as --model {path}, training needs a .pth"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # truncated, empty, text, or a pickle that needs more than weights_only allows
        try:  # the Python classes its pickle would build beyond weights: torch scans the file without running it
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001  (not a zip checkpoint at all: there is nothing to scan)
            unsafe = []
        if unsafe:
            raise CheckpointError(
                f"{path}: holds Python objects ({', '.join(unsafe[:3])}) besides weights, which are never unpickled here; re-save its state_dict"
            ) from None
        # torch's text advises weights_only=False, which would run the file's code: that advice is never passed on
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        reason = detail[1][:200] if detail else cli.first_line(e, 200)
        reason = type(e).__name__ if "weights_only" in reason else reason
        raise CheckpointError(
            f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}{': ' + reason if reason != type(e).__name__ else ''})"
        ) from None


def load_model(path):
    """(model in eval mode, the DatasetInfo of its classes) of our checkpoints, CoinCheung's released state dict or
    mmseg's {'state_dict', 'meta'}, loaded strictly. The classes: the description saved with it, mmseg's meta, or for
    released weights and older checkpoints without one, Cityscapes for 19 classes and numbered classes otherwise."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: expected a dict of weights, got {type(checkpoint).__name__}"
        )
    if "model_config" in checkpoint:
        config, state, description = (
            ModelConfig.from_dict(checkpoint["model_config"], path),
            checkpoint["model"],
            checkpoint.get("dataset"),
        )
    else:
        from interop import (
            foreign_state,
        )  # other repositories' layouts, read only when given one of their files

        config, state, description = foreign_state(checkpoint, path)
    model = BiSeNetV1(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the model: {cli.first_line(e)}"
        ) from None
    bad = non_finite(state)
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); it comes from a diverged run, use an earlier checkpoint"
        )
    return model.eval(), checkpoint_dataset(description, config.num_classes, source=path)


def checkpoint_dataset(description, num_classes, *, source):
    """The DatasetInfo of a dataset description saved with a checkpoint; without one, a 19-class model is a
    Cityscapes one and others get numbered class names and a palette of their size."""
    if not description:
        return CITYSCAPES if num_classes == NUM_CLASSES else unnamed_classes(num_classes)
    try:
        palette = description.get("palette") or voc_palette(len(description["class_names"]))
        info = DatasetInfo.from_dict({**description, "palette": palette})
        if len(info.palette) != info.num_classes or any(
            len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in info.palette
        ):
            raise ValueError("palette does not fit the classes")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{source}: its dataset description is malformed ({cli.first_line(e)}); re-save it, or load it with --load-from in train.py"
        ) from None
    if info.num_classes != num_classes:
        raise CheckpointError(
            f"{source}: its dataset description names {info.num_classes} classes, the model has {num_classes}"
        )
    return info


def load_backbone(model, source, *, log=print):
    """ImageNet ResNet weights in torchvision's format (fc.* ignored), from a path or an URL (cached by torch.hub)."""
    if re.match(r"^https?://", str(source)):
        try:
            state = torch.hub.load_state_dict_from_url(
                str(source), map_location="cpu", weights_only=True, progress=False
            )
        except (
            OSError,
            RuntimeError,
        ) as e:  # URLError, HTTPError, a timeout, or a download that is not a checkpoint
            reason = getattr(e, "reason", None) or cli.first_line(e, 200)
            raise CheckpointError(
                f"{source}: could not download the backbone weights ({reason}); check the URL and the network, or pass a local file"
            ) from None
    else:
        state = read_checkpoint(source)
    from interop import backbone_state  # torchvision's layout, read only with --pretrained

    state = backbone_state(state, source)
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: backbone does not fit: {cli.first_line(e)}") from None
    log(f"loaded ImageNet backbone from {source}: {len(state)} tensors")


def last_checkpoint_note(work_dir):
    saved = iteration_checkpoints(work_dir)
    return (
        f"The last good checkpoint is kept: {saved[-1][1]}"
        if saved
        else "No checkpoint had been written yet."
    )


# -- Training checkpoints: what a run saves and how it continues --------------------------------------------
def save_checkpoint(path, model, *, optimizer, scaler, iteration, best, settings, dataset):
    """Only finite weights are written: a diverged step must never replace the last good checkpoint."""
    state = model.state_dict()
    bad = non_finite(state)
    if bad:
        which = f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}"
        hint = f"lower --lr, or check the data. {last_checkpoint_note(path.parent)}"
        raise CheckpointError(
            f"the weights hold NaN or inf after iteration {iteration} ({which}), so {path.name} was not written: {hint}"
        )
    checkpoint = {
        "model_config": model.config.to_dict(),
        "model": state,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
    }
    atomic_save(
        checkpoint
        | {
            "iteration": iteration,
            "best_miou": best,
            "args": settings,
            "dataset": dataset.to_dict(),
        },
        path,
    )


def restore(checkpoint, path, *, model, optimizer, scaler, runtime, info):
    """(iteration, best mIoU) of a training checkpoint, its state loaded into model/optimizer/scaler. A run goes on
    only with its own model and its own classes: its best mIoU would otherwise compare other data."""
    saved_config = ModelConfig.from_dict(checkpoint["model_config"], path)
    if saved_config != model.config:
        names = sorted(
            (f.name for f in dataclasses.fields(ModelConfig)),
            key=lambda name: name not in ("depth", "num_classes"),
        )  # what the flags set first
        changed = [
            f"{n} {getattr(saved_config, n)} -> {getattr(model.config, n)}"
            for n in names
            if getattr(saved_config, n) != getattr(model.config, n)
        ]
        changes = ", ".join(changed[:2]) + (
            f" and {len(changed) - 2} settings that follow from them" if len(changed) > 2 else ""
        )
        raise CheckpointError(
            f"{path}: a run of another model configuration ({changes}); pass a new --work-dir, or the flags of that run"
        )
    saved_classes = tuple((checkpoint.get("dataset") or {}).get("class_names") or ())
    if saved_classes and saved_classes != info.class_names:
        k = next(k for k, (a, b) in enumerate(zip(saved_classes, info.class_names)) if a != b)
        other = f"class {k} was {saved_classes[k]!r}, the data's is {info.class_names[k]!r}"
        raise CheckpointError(
            f"{path}: a run on other classes ({other}); pass a new --work-dir, or --load-from {path} to fine-tune on this data"
        )
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when that run had no loss scaling (bf16 or fp32)
        runtime.load_scaler_state(scaler, checkpoint["scaler"])
    return checkpoint["iteration"], checkpoint["best_miou"]


def open_work_dir(work_dir, resume, *, runtime, log=print):
    """Rank 0 takes the work dir's lock and clears killed runs' temp files; every rank then finds the same resume
    checkpoint (None for a fresh run), reading the work dir that rank 0 writes (shared storage across machines)."""
    held = None
    if runtime.is_main:
        held = lock(work_dir)
        for path in sorted(
            work_dir.glob(".*.tmp")
        ):  # with the lock held, none belongs to a live process
            path.unlink(missing_ok=True)
            log(f"removed {path.name}, left by a run that was killed while writing")
        latest = work_dir / "latest.pth"
        if not resume and (
            iteration_checkpoints(work_dir)
            or (work_dir / "best.pth").exists()
            or latest.exists()
            or latest.is_symlink()
        ):
            contents = work_dir_contents(
                work_dir
            )  # a run without --resume never writes over an earlier run's checkpoints
            raise WorkDirError(
                f"{work_dir} holds the checkpoints of a run ({contents}); pass --resume to continue it, or a new --work-dir"
            )
    if not resume:
        return held, None, None
    checkpoint, path, note = resume_point(work_dir)
    if note and runtime.is_main:
        log(f"{note}: resuming from {path.name}, the newest complete checkpoint")
    return held, checkpoint, path
