"""What a training run reports as it goes: the progress bar, rank 0's messages, work_dir/log.jsonl, TensorBoard
scalars where tensorboard is installed, and the training images per second the final JSON line gives."""

import json

from tqdm import tqdm


def due(it, interval, iters):
    """Whether the periodic work of 0-based iteration `it` runs: every `interval` iterations and at the end."""
    return (it + 1) % interval == 0 or it + 1 == iters


class RunLog:
    """rank 0's record of a run: messages above the progress bar, JSON lines, TensorBoard scalars if installed."""

    def __init__(self, work_dir, enabled):
        self.enabled, self.file, self.writer = enabled, None, None
        if enabled:
            self.file = open(work_dir / "log.jsonl", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(work_dir / "tb"))
            except ImportError:
                pass

    def message(self, text):
        if self.enabled:
            tqdm.write(text)

    def record(self, entry, **scalars):
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, entry["iter"])

    def close(self):
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


class Speed:
    """Training images per second and the share of it spent waiting for data, over the steps after the first few
    (allocator and kernel warm-up)."""

    def __init__(self, *, images_per_iter, start, iters):
        self.images_per_iter, self.first_timed = images_per_iter, start + min(10, max((iters - start) // 10, 1))
        self.images, self.seconds, self.data_seconds, self.last_step = 0, 0.0, 0.0, None

    def step(self, it, *, data_time, step_time):
        self.last_step = step_time
        if it >= self.first_timed:
            self.images, self.seconds, self.data_seconds = self.images + self.images_per_iter, self.seconds + step_time, self.data_seconds + data_time

    @property
    def img_s(self):
        return self.images / self.seconds if self.seconds else self.images_per_iter / self.last_step

    def summary(self):
        timed = bool(self.seconds)
        return {"train_fps": round(self.img_s, 2) if timed else None, "data_wait_frac": round(self.data_seconds / self.seconds, 3) if timed else None}


class Progress:
    """The progress bar and Speed every step; every `interval` iterations and at the end one JSON log line and
    TensorBoard scalars."""

    def __init__(self, bar, run_log, *, interval, iters, speed):
        self.bar, self.run_log, self.interval, self.iters, self.speed = bar, run_log, interval, iters, speed

    def step(self, it, *, loss, lr, data_time, step_time):
        self.speed.step(it, data_time=data_time, step_time=step_time)
        self.bar.update()
        if not due(it, self.interval, self.iters):
            return
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{self.speed.img_s:.1f}")
        entry = {"iter": it + 1, "loss": loss, "lr": lr, "img_s": self.speed.img_s, "data_wait_s": data_time, "step_s": step_time}
        self.run_log.record(entry, **{"train/loss": loss, "train/lr": lr})
