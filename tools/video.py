"""Live video: segment a video file or a camera stream frame by frame and write the overlay video.

    python tools/deploy.py --model r18_int8.xml --video drive.mp4 --out drive_seg.mp4
    python tools/deploy.py --ckpt model.pth --video 0   # camera 0, until the stream ends or Ctrl-C

The overlay is half frame, half palette colour of the predicted class (evaluate.py --format
overlay), at the input's size and frame rate. The bar shows each frame's model latency and the
effective FPS (frames per wall-clock second, decoding and encoding included).
"""

import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from cli import atomic_write
from datasets import DataError

CODECS = {".mp4": "mp4v", ".avi": "MJPG"}  # what OpenCV's pip wheels can write


def open_source(source):
    """A video file, or a camera index (0, 1, ...)."""
    capture = cv2.VideoCapture(int(source) if str(source).isdigit() else str(source))
    if not capture.isOpened():
        raise DataError(
            f"--video {source}: cannot open it (no such file, not a video OpenCV reads, or no "
            "such camera)"
        )
    return capture


def default_output(source):
    return Path(
        f"camera{source}_bisenet.mp4"
        if str(source).isdigit()
        else f"{Path(source).stem}_bisenet.mp4"
    )


def overlay(frame, pred, colors):
    """frame: HxWx3 uint8 BGR; pred: HxW class indices; colors: Cx3 uint8 BGR."""
    return cv2.addWeighted(frame, 0.5, colors[pred], 0.5, 0)


def segment_video(segment, source, *, out, info, device="cpu", progress=True):
    """Reads `source` frame by frame, writes the overlay video to `out` and returns the summary. The
    video is written under a temporary name and published at the end without replacing anything (a
    file that appeared at `out` meanwhile is kept, and the video goes to OUT_2); Ctrl-C ends a
    camera stream and keeps what was written."""
    capture = open_source(source)
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0  # cameras may not say
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    colors = np.ascontiguousarray(info.colors[:, ::-1])
    latencies, interrupted = [], False
    bar = tqdm(total=total if total > 0 else None, unit="frame", desc="video", disable=not progress)
    output = atomic_write(out, replace=False, keep_both=True, suffix=f".tmp{out.suffix}")
    with output as temp:
        writer = cv2.VideoWriter(
            str(temp), cv2.VideoWriter_fourcc(*CODECS[out.suffix]), fps, (width, height)
        )
        started = time.perf_counter()
        try:
            if not writer.isOpened():
                raise DataError(f"--out {out}: OpenCV cannot write this video")
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                tick = time.perf_counter()
                images = (
                    torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                    .permute(2, 0, 1)[None]
                    .to(device)
                )
                pred = segment(images)[0].to(torch.uint8).cpu().numpy()
                latencies.append(time.perf_counter() - tick)
                writer.write(overlay(frame, pred, colors))
                bar.update()
                bar.set_postfix(
                    latency_ms=f"{1000 * latencies[-1]:.0f}",
                    fps=f"{len(latencies) / (time.perf_counter() - started):.1f}",
                )
        except KeyboardInterrupt:
            interrupted = True
        finally:
            elapsed = time.perf_counter() - started
            bar.close()
            capture.release()
            writer.release()
        if not latencies:
            raise DataError(f"--video {source}: no frame could be read")
    return video_summary(
        source,
        output.path,
        out=out,
        total=total,
        latencies=latencies,
        elapsed=elapsed,
        fps=fps,
        size=(height, width),
        interrupted=interrupted,
    )


def video_summary(source, written, *, out, total, latencies, elapsed, fps, size, interrupted):
    """The JSON summary of a segmented video, with a warning for each way the written file differs
    from the input."""
    height, width = size
    probe = cv2.VideoCapture(str(written))
    # codecs may round odd sizes down
    out_height = int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT))
    out_size = f"{out_height}x{int(probe.get(cv2.CAP_PROP_FRAME_WIDTH))}"
    probe.release()
    truncated = total > 0 and len(latencies) < total and not interrupted
    if written != out:
        print(
            f"warning: {out} appeared while the video was written; it was kept, and the video "
            f"is {written}",
            file=sys.stderr,
        )
    if out_size != f"{height}x{width}":
        print(
            f"warning: {written} is {out_size}, the input {height}x{width} (its codec rounds "
            "odd sizes down)",
            file=sys.stderr,
        )
    if truncated:
        print(
            f"warning: {source} ended after {len(latencies)} of its {total} frames (a truncated "
            "file?)",
            file=sys.stderr,
        )
    latency_ms = 1000 * statistics.median(latencies)
    return {
        "video": str(source),
        "out": str(written),
        "frames": len(latencies),
        "frames_expected": total if total > 0 else None,
        "truncated": truncated,
        "size": f"{height}x{width}",
        "out_size": out_size,
        "input_fps": round(fps, 2),
        "effective_fps": round(len(latencies) / elapsed, 2),
        "latency_ms_median": round(latency_ms, 2),
        "model_fps": round(1000 / latency_ms, 2),
        "interrupted": interrupted,
    }
