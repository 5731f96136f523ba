"""The pictures of a training run, from its log.jsonl; train.py runs this after each validation
and at the end.

    python tools/plot_run.py work_dirs/bisenetv1      # any run's work dir, running or finished

Writes into the work dir: curves.png (training loss, learning rate and val mIoU against iteration;
a panel with nothing logged yet says so) and, from the newest validation, confusion.csv (pixels:
rows ground truth, columns prediction), confusion.png (each row in percent of the class's labelled
pixels) and per_class_iou.png. A line of the log that is not an entry train.py writes is skipped,
with a warning that names it. The last line printed is JSON.
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


def numeric(value, *, none=True):
    """A JSON number (true and false are not), or null where none allows it."""
    if value is None:
        return none
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def well_formed(entry):
    """Whether a parsed line is an entry train.py writes, as far as the pictures read it."""
    if not isinstance(entry, dict) or not numeric(entry.get("iter"), none=False):
        return False
    if not all(numeric(entry[key]) for key in ("loss", "lr", "val_mIoU") if key in entry):
        return False
    if "val_confusion" not in entry:
        return True
    names, confusion = entry.get("val_iou"), entry["val_confusion"]
    if not isinstance(names, dict) or not all(map(numeric, names.values())):
        return False
    return (
        isinstance(confusion, list)
        and len(confusion) == len(names)
        and all(isinstance(row, list) and len(row) == len(names) for row in confusion)
        and all(numeric(v, none=False) and v >= 0 for row in confusion for v in row)
    )


def read_log(work_dir):
    """The entries of work_dir/log.jsonl. A line that is not one is skipped with a warning, but for
    a last line cut short by a running writer, which is left out quietly."""
    path = Path(work_dir) / "log.jsonl"
    if not path.is_file():
        raise cli.UsageError(f"{path}: not found; pass the --work-dir of a train.py run")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    entries, skipped = [], []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if well_formed(entry):
            entries.append(entry)
        elif line.strip() and not (number == len(lines) and not text.endswith("\n")):
            skipped.append(number)
    if skipped:
        named = ", ".join(map(str, skipped[:10])) + (
            f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        )
        what = (
            "lines {} skipped: not entries" if len(skipped) > 1 else "line {} skipped: not an entry"
        )
        print(
            f"warning: {path}: {what.format(named)} train.py writes; the pictures are drawn from "
            "the other lines",
            file=sys.stderr,
        )
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


NOTHING_YET = {  # what a panel says where the log holds none of its points
    "loss": "no training loss logged yet:\ntrain.py logs it every --log-interval\n"
    "iterations and at the end",
    "val_mIoU": "no validation yet:\ntrain.py validates every --val-interval\n"
    "iterations and at the end",
}


def plot_curves(plt, entries, path):
    """Loss, learning rate and val mIoU (an empty validation, logged as null, leaves a gap) against
    iteration; a single point is drawn as a mark, a panel with none says so."""
    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_mIoU" in e]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = (
        ("loss", train, "training loss"),
        ("lr", train, "learning rate"),
        ("val_mIoU", val, "val mIoU"),
    )
    for axis, (key, rows, title) in zip(axes, series):
        axis.set_title(title)
        points = sum(e[key] is not None for e in rows)
        if not points:
            why = NOTHING_YET["val_mIoU" if key == "val_mIoU" else "loss"]
            why = why if not rows else f"every {title} logged is null\n(not a finite number)"
            axis.text(0.5, 0.5, why, ha="center", va="center", transform=axis.transAxes)
            axis.axis("off")
            continue
        axis.plot(
            [e["iter"] for e in rows],
            [np.nan if e[key] is None else e[key] for e in rows],
            marker="o" if key == "val_mIoU" or points == 1 else None,
        )
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
    percent = 100 * confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(6, 0.45 * len(names))
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("prediction")
    axis.set_ylabel("ground truth")
    for (row, column), share in np.ndenumerate(percent):
        if share >= 0.5:
            axis.text(
                column,
                row,
                f"{share:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share > 50 else "black",
            )
    figure.colorbar(image, fraction=0.046, label="percent of the class's labelled pixels")
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
