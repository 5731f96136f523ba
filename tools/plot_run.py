"""The pictures of a training run, from its log.jsonl; train.py runs this after each validation and at the end.

    python tools/plot_run.py work_dirs/bisenetv1                  # any run's work dir, running or finished

Writes into the work dir: curves.png (training loss, learning rate and val mIoU against iteration) and, from the
newest validation, confusion.csv (pixels: rows ground truth, columns prediction), confusion.png (each row normalised
to the class's labelled pixels) and per_class_iou.png. The last line printed is JSON.
"""

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from cli import atomic_write


def read_log(work_dir):
    """The JSON lines of work_dir/log.jsonl (a line cut short by a running writer is left out)."""
    path = Path(work_dir) / "log.jsonl"
    if not path.is_file():
        raise cli.UsageError(f"{path}: not found; pass the --work-dir of a train.py run")
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise cli.UsageError("matplotlib is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path):
    figure.tight_layout()
    with atomic_write(path, suffix=".tmp.png") as temp:
        figure.savefig(temp, format="png", dpi=100)
    plt.close(figure)


def plot_curves(plt, entries, path):
    """Loss, learning rate and val mIoU (an empty validation, logged as null, leaves a gap) against iteration."""
    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_mIoU" in e]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = (
        ("loss", train, "training loss"),
        ("lr", train, "learning rate"),
        ("val_mIoU", val, "val mIoU"),
    )
    for axis, (key, rows, title) in zip(axes, series):
        axis.plot(
            [e["iter"] for e in rows],
            [np.nan if e[key] is None else e[key] for e in rows],
            marker="o" if key == "val_mIoU" else None,
        )
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    save_figure(plt, figure, path)


def write_confusion(plt, entry, work_dir):
    """confusion.csv and the row-normalised heat map of one validation."""
    names, confusion = list(entry["val_iou"]), np.array(entry["val_confusion"], dtype=np.int64)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ground truth \\ prediction", *names])
    writer.writerows([name, *row] for name, row in zip(names, confusion.tolist()))
    with atomic_write(work_dir / "confusion.csv") as temp:
        temp.write_text(text.getvalue())
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(6, 0.45 * len(names))
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("prediction")
    axis.set_ylabel("ground truth")
    for (row, column), share in np.ndenumerate(shares):
        if share >= 0.005:
            axis.text(
                column,
                row,
                f"{100 * share:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share > 0.5 else "black",
            )
    figure.colorbar(image, fraction=0.046, label="share of the class's labelled pixels")
    axis.set_title(f"confusion at iteration {entry['iter']} (percent of each row)")
    save_figure(plt, figure, work_dir / "confusion.png")


def plot_per_class(plt, entry, path):
    names, values = (
        list(entry["val_iou"]),
        [np.nan if v is None else v for v in entry["val_iou"].values()],
    )
    figure, axis = plt.subplots(figsize=(8, max(3, 0.3 * len(names))))
    axis.barh(range(len(names)), values, color="tab:blue")
    axis.set_yticks(range(len(names)), names)
    axis.invert_yaxis()
    for row, value in enumerate(values):
        axis.text(
            0 if np.isnan(value) else value,
            row,
            " n/a (no pixel)" if np.isnan(value) else f" {value:.1f}",
            va="center",
            fontsize=8,
        )
    axis.set_xlim(0, 105)
    axis.set_xlabel("IoU (%)")
    mean = entry["val_mIoU"]
    axis.set_title(
        f"per-class IoU at iteration {entry['iter']}"
        + (f", mIoU {mean:.2f}" if mean is not None else "")
    )
    save_figure(plt, figure, path)


def plot_run(work_dir):
    work_dir = Path(work_dir)
    entries, plt = read_log(work_dir), pyplot()
    written = [work_dir / "curves.png"]
    plot_curves(plt, entries, written[0])
    validations = [e for e in entries if "val_confusion" in e]
    if validations:
        write_confusion(plt, validations[-1], work_dir)
        plot_per_class(plt, validations[-1], work_dir / "per_class_iou.png")
        written += [
            work_dir / "confusion.csv",
            work_dir / "confusion.png",
            work_dir / "per_class_iou.png",
        ]
    return {
        "written": [str(p) for p in written],
        "validation_iter": validations[-1]["iter"] if validations else None,
    }


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("work_dir", help="a train.py run's --work-dir")
    args = parser.parse_args(argv)
    cli.main(lambda: print(json.dumps(plot_run(args.work_dir))))


if __name__ == "__main__":
    main()
