"""A training run's work dir and its bookkeeping, so that no run is ever lost: one training process
per work dir (a lock), the newest complete checkpoint to resume from, a log that only grows, and
the loop's periodic work (progress, checkpoints, validation, stop signals), each a `.step(it)`.
Its files: iter_N.pth (a complete training checkpoint after N iterations), latest.pth (a link to
the newest, hard where symbolic links are refused), best.pth (of the best val mIoU), log.jsonl (a
JSON line per log interval and validation: the pictures' source), .lock (held by train.py)."""

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen

import torch
from tqdm import tqdm

import cli
from checkpoints import TRAINING_KEYS, non_finite, read_checkpoint
from cli import CheckpointError, atomic_write
from datasets import IGNORE_INDEX
from evaluate import evaluate, inference_model, torch_segmenter

ITERATION_NAME = re.compile(r"^iter_(\d+)\.pth$")
RUN_FILES = ("log.jsonl", "curves.png", "confusion.png", "confusion.csv", "per_class_iou.png", "tb")
MB = 2**20
STOP_SIGNALS = {signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM)}  # no SIGUSR1 on Windows
DIVERGED = "lower --lr, or check the data"  # what to do when training diverged


class WorkDirError(cli.Error):
    """The work dir cannot be used as asked (in use, not writable, full, holds another run)."""


class TrainingError(cli.Error):
    """Training cannot go on (e.g. a non-finite loss in fp32)."""


class LogUnwritable(TrainingError):
    """log.jsonl or TensorBoard's file cannot be written (a full disk)."""


class Stopped(TrainingError):
    """Ctrl-C, SIGTERM or SIGUSR1 stopped the run; the exit code is 128 + the signal."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def lock(work_dir):
    """Creates work_dir and holds its lock for the life of this process (the OS drops it when the
    process dies). The lock file says who holds it."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        handle = open(work_dir / ".lock", "a+")
    except OSError as e:
        why = f"cannot write to the work dir ({e.strerror}); pass a writable --work-dir"
        raise WorkDirError(f"{work_dir}: {why}") from None
    handle.seek(0)  # msvcrt locks bytes from the file's position
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:  # POSIX record locks, which also hold across machines on NFS with a lock manager
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = handle.read().strip() or "another process"
        handle.close()
        fix = "wait for it to end, or pass another --work-dir"
        raise WorkDirError(f"{work_dir} is in use by {holder}; {fix}") from None
    handle.truncate(0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"train.py pid {os.getpid()} on {socket.gethostname()} since {since}\n")
    handle.flush()
    return handle


def iteration_checkpoints(work_dir):
    """[(N, path)] of work_dir/iter_N.pth, oldest first."""
    found = [(ITERATION_NAME.match(path.name), path) for path in work_dir.glob("iter_*.pth")]
    return sorted((int(match[1]), path) for match, path in found if match)


def last_checkpoint_note(work_dir):
    if saved := iteration_checkpoints(work_dir):
        return f"The last good checkpoint is kept: {saved[-1][1]}"
    return "No checkpoint had been written yet."


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def no_space(directory, needed):
    free = shutil.disk_usage(directory).free
    sizes = f"needs about {needed / MB:.0f} MB, {free / MB:.0f} MB free"
    return WorkDirError(f"no space left on {directory} ({sizes}); free some space and resume")


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, rename: `path` is the old file or the complete new
    one, never a part. A full disk is said as such (checked first, and on failure)."""
    directory, needed = path.parent, tensor_bytes(obj) + MB
    if shutil.disk_usage(directory).free < needed:
        raise no_space(directory, needed)
    try:
        with atomic_write(path) as temp, open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        # torch.save raises a RuntimeError while handling its file writes' ENOSPC or Ctrl-C
        chain, cause = [], e
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(error, KeyboardInterrupt) for error in chain):
            raise KeyboardInterrupt from None
        if any(getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for error in chain):
            raise no_space(directory, needed) from None
        if isinstance(e, OSError):
            why = f"could not write the checkpoint ({e.strerror or e})"
            raise WorkDirError(f"{path}: {why}; the previous checkpoints are kept") from None
        raise
    cli.sync_directory(directory)


def point_latest(work_dir, target):
    """latest.pth -> target, replaced atomically: a relative symbolic link, so the work dir can
    be moved, or a hard link where symbolic ones are refused (an ordinary Windows user)."""
    with atomic_write(work_dir / "latest.pth") as temp:
        temp.unlink()  # the unique name stays ours: only this process writes the work dir (lock)
        try:
            temp.symlink_to(target.name)
        except OSError:
            os.link(target, temp)


def work_dir_contents(work_dir):
    """What of an earlier run a work dir holds: 'iter_4.pth, best.pth, latest.pth -> iter_4.pth'."""
    names = [path.name for _, path in iteration_checkpoints(work_dir)]
    names += ["best.pth"] if (work_dir / "best.pth").exists() else []
    latest = work_dir / "latest.pth"
    if latest.is_symlink():
        missing = "" if latest.exists() else " (missing)"
        names.append(f"latest.pth -> {os.readlink(latest)}{missing}")
    elif latest.exists():
        names.append("latest.pth")
    return ", ".join(names)


def resume_point(work_dir):
    """(checkpoint dict, path, note) to continue the run in work_dir from (Nones: an unused one):
    the newest iter_N.pth whatever latest.pth says, since a kill may come between writing one and
    relinking the other. A damaged newest one stops the run: going on from an older one would
    later overwrite it."""
    saved, latest = iteration_checkpoints(work_dir), work_dir / "latest.pth"
    target = os.readlink(latest) if latest.is_symlink() else None
    if latest.exists() and not target:  # a hard link: the name of the iter_N.pth it is
        twins = [p.name for _, p in saved if latest.is_file() and os.path.samefile(p, latest)]
        if not twins:
            found = "directory" if latest.is_dir() else "file"
            expected = f"expected the link train.py writes, found a {found}"
            raise WorkDirError(f"{latest}: {expected}; move it out of the work dir and resume")
        target = twins[-1]
    if not saved:
        if contents := work_dir_contents(work_dir):  # best.pth or latest.pth without their run
            fix = "pass a new --work-dir, or move those files away to start over"
            held = f"{work_dir} holds a run ({contents}) but no iter_N.pth to resume from"
            raise WorkDirError(f"{held}; {fix}")
        return None, None, None
    newest = saved[-1][1]
    try:
        if newest.is_dir():
            raise CheckpointError(f"{newest}: a directory, not a checkpoint")
        checkpoint = read_checkpoint(newest)
        if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in TRAINING_KEYS):
            what = "not a training checkpoint of train.py (no optimizer state or iteration)"
            raise CheckpointError(f"{newest}: {what}; to start from its weights use --load-from")
    except CheckpointError as e:
        older = f"resume from {saved[-2][1].name}" if len(saved) > 1 else "start over"
        damaged = f"the newest checkpoint of the run in {work_dir} is damaged"
        raise WorkDirError(f"{e}; {damaged}: move it away to {older}") from None
    note = None
    if target is None:
        note = "latest.pth is missing"
    elif target != newest.name:
        missing = "" if latest.exists() else ", which is missing"
        note = f"latest.pth points to {target}{missing}"
    return checkpoint, newest, note


def open_work_dir(work_dir, resume, *, runtime, log=print):
    """Rank 0 takes the work dir's lock and clears killed runs' temp files; every rank then finds
    the same resume checkpoint (None for a fresh run) in the work dir rank 0 writes (shared)."""
    held = None
    if runtime.is_main:
        held = lock(work_dir)
        for path in sorted(work_dir.glob(".*.tmp")):  # with the lock held, none is a live process's
            path.unlink(missing_ok=True)
            log(f"removed {path.name}, left by a run that was killed while writing")
        # a fresh run never writes over an earlier run's checkpoints
        if not resume and (contents := work_dir_contents(work_dir)):
            fix = "pass --resume to continue it, or a new --work-dir"
            raise WorkDirError(f"{work_dir} holds the checkpoints of a run ({contents}); {fix}")
    if not resume:
        return held, None, None
    checkpoint, path, note = resume_point(work_dir)
    if note and runtime.is_main:
        log(f"{note}: resuming from {path.name}, the newest complete checkpoint")
    return held, checkpoint, path


def set_aside(work_dir):
    """Moves an earlier run's log and pictures into work_dir/earlier_run_K/ (returned), so that a
    fresh run (one whose checkpoints were moved away) never cuts or replaces them."""
    if not (work_dir / "log.jsonl").exists():  # no earlier run: a tb/ set up for this one stays
        return None
    k = 1
    while (folder := work_dir / f"earlier_run_{k}").exists():
        k += 1
    folder.mkdir()
    for name in RUN_FILES:
        if (work_dir / name).exists():
            (work_dir / name).rename(folder / name)
    return folder


def log_lines_until(text, iteration):
    """(the complete lines of log text up to `iteration`, the numbers of the garbled ones)."""
    kept, garbled = [], []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            garbled += [number] if line.endswith("\n") else []
        elif line.endswith("\n") and entry.get("iter", 0) <= iteration:
            kept.append(line)
    return kept, garbled


class RunLog(contextlib.AbstractContextManager):
    """rank 0's record of a run: messages above the progress bar, JSON lines, TensorBoard's."""

    def __init__(self, work_dir, enabled):
        self.work_dir, self.enabled, self.path = work_dir, enabled, work_dir / "log.jsonl"
        self.file = self.writer = self.plotter = None

    def start(self, iteration):
        """A fresh run sets an earlier run's files aside; a resumed one goes on from `iteration`,
        replaying what the stopped run logged after its checkpoint: those lines give way, as does a
        last line a full disk or a kill cut short. A garbled line is skipped, and said."""
        if not self.enabled:
            return
        try:
            if iteration == 0 and (folder := set_aside(self.work_dir)):
                self.message(f"an earlier run's log and pictures were moved to {folder}")
            text = self.path.read_text(errors="replace") if self.path.exists() else ""
            kept, garbled = log_lines_until(text, iteration)
            if garbled:
                skipped = f"skipped {len(garbled)} garbled lines (first: line {garbled[0]})"
                self.message(f"warning: {self.path}: {skipped}")
            with atomic_write(self.path) as temp:
                temp.write_text("".join(kept))
            self.file = open(self.path, "a")
            from torch.utils.tensorboard import SummaryWriter

            # its writer thread's errors (a full disk) come back through record(), untraced
            threading.excepthook = tensorboard_quiet
            self.writer = SummaryWriter(str(self.work_dir / "tb"))
        except ImportError:
            fix = "scalars go to log.jsonl only (pip install tensorboard)"
            self.message(f"TensorBoard is not installed: {fix}")
        except OSError as e:
            raise self.failed(e) from None

    def message(self, text):
        if self.enabled:
            tqdm.write(text)

    def record(self, entry, **scalars):
        entry = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in entry.items()
        }
        try:
            if self.file:
                self.file.write(json.dumps(entry) + "\n")
                self.file.flush()
            for name, value in scalars.items() if self.writer else ():
                self.writer.add_scalar(name, value, entry["iter"])
        except OSError as e:
            raise self.failed(e) from None

    def failed(self, error):
        why = f"cannot write the run's log ({error.strerror or error}); free some space"
        return LogUnwritable(f"{self.work_dir}: {why}")

    def draw(self, *, wait=False):
        """Redraws the run's pictures (tools/plot_run.py) in a process of their own: training
        neither waits for matplotlib nor fails with it. At the end (wait) a failure is said."""
        drawing = self.plotter and self.plotter.poll() is None
        if not self.enabled or (drawing and not wait):
            return
        if drawing:  # its files are written atomically: the final drawing replaces them
            self.plotter.terminate()
            self.plotter.wait()
        plot_run = Path(__file__).resolve().parent / "tools" / "plot_run.py"
        command = [sys.executable, str(plot_run), str(self.work_dir)]
        self.plotter = Popen(command, stdout=DEVNULL, stderr=PIPE, text=True)
        if wait and self.plotter.wait():
            said = self.plotter.stderr.read().strip().splitlines()
            said = said[-1] if said else f"exit code {self.plotter.returncode}"
            retry = f"python tools/plot_run.py {self.work_dir} retries"
            self.message(f"warning: the run's pictures were not drawn ({said}); {retry}")

    def __exit__(self, *error):
        """Closes the log whatever ended the run: on a full disk what is left unwritten was said."""
        for handle in (self.file, self.writer):
            if handle:
                with contextlib.suppress(OSError):
                    handle.close()


def tensorboard_quiet(hook):
    if "tensorboard" not in type(hook.thread).__module__:
        threading.__excepthook__(hook)


def due(it, interval, iters):
    """Whether 0-based iteration `it` does the periodic work: every `interval`, and at the end."""
    return (it + 1) % interval == 0 or it + 1 == iters


class Progress:
    """The progress bar every step, a log line every `interval` iterations and at the end; images
    per second and the share of time waiting for data, timed after the first (warm-up) steps."""

    def __init__(self, run_log, *, interval, start, iters, images_per_iter):
        self.run_log, self.interval, self.iters = run_log, interval, iters
        self.images_per_iter = images_per_iter
        shown = dict(disable=not run_log.enabled, dynamic_ncols=True, desc="train")
        self.bar = tqdm(total=iters, initial=start, **shown)
        self.first_timed = start + min(10, max((iters - start) // 10, 1))
        self.images, self.seconds, self.data_seconds = 0, 0.0, 0.0

    def step(self, it, *, loss, lr, data_time, step_time):
        if it >= self.first_timed:
            self.images += self.images_per_iter
            self.seconds += step_time
            self.data_seconds += data_time
        self.bar.update()
        if due(it, self.interval, self.iters):
            img_s = self.images / self.seconds if self.seconds else self.images_per_iter / step_time
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
            entry = dict(
                iter=it + 1, loss=loss, lr=lr, img_s=img_s, data_wait_s=data_time, step_s=step_time
            )
            self.run_log.record(entry, **{"train/loss": loss, "train/lr": lr})

    def summary(self):
        fps = round(self.images / self.seconds, 2) if self.seconds else None
        wait = round(self.data_seconds / self.seconds, 3) if self.seconds else None
        return {"train_fps": fps, "data_wait_frac": wait}


class Checkpointer:
    """iter_N.pth every `interval` iterations and at the end, latest.pth pointed at it, the oldest
    beyond `keep` pruned; rank 0 (which logs) writes. `path`: the newest (at first the resumed)."""

    def __init__(self, run_log, model, *, contents, interval, iters, keep, path, best):
        self.run_log, self.work_dir, self.model = run_log, run_log.work_dir, model
        self.contents, self.best, self.path = contents, best, path
        self.interval, self.iters, self.keep = interval, iters, keep

    def save(self, path, iteration):
        """Only finite weights: a diverged step must never replace the last good checkpoint."""
        if not self.run_log.enabled:
            return
        state = self.model.state_dict()
        if bad := non_finite(state):
            which = f"{bad[0]} and {len(bad) - 1} more" if len(bad) > 1 else bad[0]
            hint = f"{DIVERGED}. {last_checkpoint_note(path.parent)}"
            where = f"the weights hold NaN or inf after iteration {iteration} ({which})"
            raise CheckpointError(f"{where}, so {path.name} was not written: {hint}")
        checkpoint = {
            "model_config": self.model.config.to_dict(),
            "model": state,
            "optimizer": self.contents["optimizer"].state_dict(),
            "scaler": self.contents["scaler"].state_dict(),
            "iteration": iteration,
            "best_miou": self.best,
            "args": self.contents["settings"],
            "dataset": self.contents["dataset"].to_dict(),
        }
        atomic_save(checkpoint, path)

    def step(self, it, *, now=False):
        path = self.work_dir / f"iter_{it + 1}.pth"
        if not (now or due(it, self.interval, self.iters)) or self.path == path:
            return
        self.path = path
        self.save(path, it + 1)
        if self.run_log.enabled:
            point_latest(self.work_dir, path)
            old = iteration_checkpoints(self.work_dir)[: -self.keep] if self.keep > 0 else []
            for _, removed in old:
                removed.unlink(missing_ok=True)
                self.run_log.message(f"removed {removed.name} (--keep-checkpoints {self.keep})")


class Preemption(contextlib.AbstractContextManager):
    """SIGTERM (what SLURM, Kubernetes and spot instances send before SIGKILL) and SIGUSR1 (SLURM's
    --signal) stop the run: before the loop at once; in the loop every rank finishes its step, they
    agree on the iteration, rank 0 saves it, and the run ends (Stopped)."""

    def __init__(self, work_dir):
        self.work_dir, self.signum, self.in_loop = work_dir, None, False
        # signal.signal returns the handler it replaces
        self.previous = {signum: signal.signal(signum, self.received) for signum in STOP_SIGNALS}

    def __exit__(self, *error):
        """The handlers the process had before: a run inside a longer process ends its own."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def received(self, signum, _frame):
        self.signum = signum
        if self.in_loop:
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.exit(128 + signum)  # one of several ranks: the launcher or the failed rank says why
        name, saved = signal.Signals(signum).name, last_checkpoint_note(self.work_dir)
        raise Stopped(f"stopped by {name} before the first step. {saved}", signum)

    def loop_begins(self):
        """From here every rank reaches the end of its step, where they agree: a signal waits
        for it (set before the first step, whose log line may already bring the signal)."""
        self.in_loop = True

    def step(self, it, runtime, checkpointer):
        if not runtime.any_rank(self.signum is not None):
            return
        checkpointer.step(it, now=True)
        signum = self.signum or signal.SIGTERM  # another rank's signal
        if not runtime.is_main:
            sys.exit(128 + signum)  # rank 0 says it, once
        resume = "run the same command with --resume (the launch scripts do) to continue"
        saved = f"after iteration {it + 1}; saved {checkpointer.path}"
        raise Stopped(f"stopped by {signal.Signals(signum).name} {saved}; {resume}", signum)


def setting_text(value):
    if isinstance(value, (tuple, list)):
        joiner = "x" if all(isinstance(v, int) for v in value) else ","
        return joiner.join(map(setting_text, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def changed_settings(saved, current, names):
    """'--lr 0.01 (was 0.02), ...': the settings `names` of this command that differ from the
    resumed run's."""
    changes = []
    for name in (name for name in names if name in saved):
        now, was = setting_text(current[name]), setting_text(saved[name])
        if now != was:
            flag = "world size" if name == "world_size" else "--" + name.replace("_", "-")
            changes.append(f"{flag} {now} (was {was})")
    return ", ".join(changes)


@contextlib.contextmanager
def saved_on_error(checkpointer, it):
    """Risky periodic work (validation): an error there first saves the iteration reached."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(cli.Error, OSError):
            checkpointer.step(it, now=True)
        raise


class StepCheck:
    """An fp16 overflow skips the step and lowers the scale (a static --loss-scale is put back); a
    non-finite loss otherwise, or a scale below 1, ends the run, the last good checkpoint kept."""

    def __init__(self, scaler, run_log, *, static_scale):
        self.scaler, self.run_log, self.static_scale = scaler, run_log, static_scale
        self.scale_before = scaler.get_scale()
        self.unlabelled = 0  # batches without a labelled pixel: they train nothing (loss 0)

    def step(self, it, loss, labels):
        if not (labels != IGNORE_INDEX).any():
            self.unlabelled += 1
            self.run_log.record(
                {"iter": it + 1, "unlabelled_batch": True, "unlabelled_batches": self.unlabelled}
            )
        before, self.scale_before = self.scale_before, self.scaler.get_scale()
        if self.scaler.is_enabled() and self.scaler.get_scale() < before:
            if self.static_scale:
                self.scaler.update(float(self.static_scale))
            scale = self.scale_before = self.scaler.get_scale()
            skipped = f"fp16 gradients overflowed, step skipped, loss scale {before:g} -> {scale:g}"
            self.run_log.message(f"iter {it + 1}: {skipped}")
            self.run_log.record({"iter": it + 1, "overflow": True, "loss_scale": scale})
            if scale < 1:
                saved = last_checkpoint_note(self.run_log.work_dir)
                fix = f"lower --lr, or use --amp-dtype bfloat16 or --amp O0. {saved}"
                fell = f"the fp16 loss scale fell to {scale:g} at iteration {it + 1}"
                why = "gradients overflow at any scale, so training diverged"
                raise TrainingError(f"{fell}: {why}; {fix}")
        elif not math.isfinite(loss):
            fix = f"{DIVERGED}. {last_checkpoint_note(self.run_log.work_dir)}"
            raise TrainingError(f"loss is {loss} at iteration {it + 1}; {fix}")


class Validation:
    """val mIoU every `interval` iterations and at the end, scored as evaluate.py scores the
    checkpoint (rank 0's BatchNorm, folded): one checkpoint, one number. A new best is best.pth."""

    def __init__(self, val_set, model, checkpointer, *, runtime, amp, workers, interval):
        self.val_set, self.model, self.checkpointer = val_set, model, checkpointer
        self.runtime, self.amp, self.workers = runtime, amp, workers
        self.interval, self.result = interval, None

    def step(self, it):
        if self.val_set is None or not due(it, self.interval, self.checkpointer.iters):
            return
        run_log = self.checkpointer.run_log
        self.runtime.share_buffers(self.model)
        model = inference_model(self.model, self.runtime)
        segment = torch_segmenter(model, self.runtime, amp=self.amp)
        self.result = evaluate(segment, self.val_set, runtime=self.runtime, workers=self.workers)
        miou, best = self.result["mIoU"], self.checkpointer.best
        improved = math.isfinite(miou) and (best is None or miou > best)
        best = self.checkpointer.best = miou if improved else best
        undefined = "undefined: no val pixel is labelled, so it is never a best"
        shown = f"{miou:.2f} (ss whole)" if math.isfinite(miou) else undefined
        best_text = "no best yet" if best is None else f"best {best:.2f}"
        run_log.message(f"iter {it + 1}: val mIoU {shown}, {best_text}")
        names, iou = self.val_set.info.class_names, self.result["iou"]
        per_class = {name: None if math.isnan(v) else 100 * v for name, v in zip(names, iou)}
        entry = {f"val_{key}": self.result[key] for key in ("mIoU", "mDice", "mAcc", "aAcc")}
        entry |= {"val_iou": per_class, "val_confusion": self.result["confusion"]}
        run_log.record({"iter": it + 1, **entry}, **{"val/mIoU": miou})
        run_log.draw()
        if improved:
            self.checkpointer.save(self.checkpointer.work_dir / "best.pth", it + 1)
