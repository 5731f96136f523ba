"""tools/map_labels.py and tools/plot_run.py: a copy the user edits never edits the original, and a
log that is garbled in places or holds little still gives true pictures, never a traceback."""

import csv
import json
import os
import re

import matplotlib
import matplotlib.figure
import numpy as np
import pytest
from conftest import copy_of, digest, in_process, last_json
from PIL import Image

import cityscapes
import plot_run
import synthetic


def dataset(tmp_path, layout):
    return synthetic.synthesize_folder(
        tmp_path / "data", classes=3, train=2, val=1, height=32, width=48, layout=layout, seed=1
    )


def edit_in_place(path):
    """What an editor that saves in place does (PIL and cv2 write so too): same file, new bytes."""
    with open(path, "r+b") as file:
        file.seek(0, os.SEEK_END)
        file.write(b"\nedited\n")


@pytest.mark.parametrize("layout", ["cityscapes", "mmseg", "list", "camvid"])
def test_every_file_of_a_mapped_copy_is_its_own(layout, tmp_path, synthetic_root):
    root = (
        copy_of(synthetic_root, tmp_path) if layout == "cityscapes" else dataset(tmp_path, layout)
    )
    before = digest(root)
    result = in_process("tools/map_labels.py", root, tmp_path / "out", "--map", "0=1")
    assert result.returncode == 0, result.stderr[-3000:]
    copied = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert {str(p.relative_to(tmp_path / "out")) for p in copied} == {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
    }
    assert any(p.suffix in (".txt", ".json") for p in copied) or layout == "camvid"
    for _, label in cityscapes.open_dataset(root, "train").samples:
        original = np.array(Image.open(label))
        mapped = np.array(Image.open(tmp_path / "out" / label.relative_to(root)))
        assert np.array_equal(mapped, np.where(original == 0, 1, original)), label
    for path in copied:
        edit_in_place(path)
    assert digest(root) == before


def test_linked_images_are_the_only_shared_files(tmp_path):
    root = dataset(tmp_path, "list")
    result = in_process(
        "tools/map_labels.py", root, tmp_path / "out", "--map", "0=1", "--link-images"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = {p.relative_to(root) for p in (root / "images").iterdir()}
    for path in root.rglob("*"):
        if path.is_file():
            shared = os.path.samefile(path, tmp_path / "out" / path.relative_to(root))
            assert shared == (path.relative_to(root) in images), path
    assert last_json(result.stdout)["linked_images"] == len(images)
    for name in ("classes.txt", "train.txt", "val.txt"):
        edit_in_place(tmp_path / "out" / name)
    assert "edited" not in "".join((root / n).read_text() for n in ("classes.txt", "train.txt"))


# -- plot_run --------------------------------------------------------------------------------------
NAMES = ("road", "car", "sky")


def validation(iteration, confusion):
    confusion = np.array(confusion)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = {name: 100 * confusion[k, k] / union[k] for k, name in enumerate(NAMES)}
    return {
        "iter": iteration,
        "val_mIoU": float(np.mean(list(iou.values()))),
        "val_iou": iou,
        "val_confusion": confusion.tolist(),
    }


GOOD = [
    {"iter": 2, "loss": 1.5, "lr": 0.01},
    {"iter": 4, "loss": 1.0, "lr": 0.005},
    validation(4, [[50, 5, 0], [10, 30, 0], [0, 1, 99]]),
]


def write_log(tmp_path, lines):
    """A work dir whose log.jsonl holds these lines (entries as JSON, strings as they are)."""
    work_dir = tmp_path / "wd"
    work_dir.mkdir()
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (work_dir / "log.jsonl").write_text(text)
    return work_dir


def drawn(monkeypatch, work_dir):
    """plot_run's summary and its figures in the order drawn (curves, confusion, per-class IoU);
    savefig itself still runs, the figures are only kept for a look at what they hold."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return plot_run.plot_run(work_dir), figures


def curve(axis):
    """The (x, y) points of an axis's one line."""
    (line,) = axis.lines
    return list(zip(line.get_xdata(), line.get_ydata()))


def skipped_lines(stderr):
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, stderr
    found = re.search(r"lines? ([\d, ]+) skipped", warnings[0])
    assert found, warnings[0]
    return [int(n) for n in found.group(1).split(",")]


RAGGED = [[1, 0, 0], [0, 1], [0, 0, 1]]
IDENTITY = np.eye(3, dtype=np.int64)
GARBLED = {
    "no iter": {"loss": 1.2, "lr": 0.01},
    "a bare number": 5,
    "a list": [1, 2],
    "a ragged confusion": validation(6, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    | {"val_confusion": RAGGED},
    "a confusion of another size": validation(6, IDENTITY) | {"val_confusion": [[1, 0], [0, 1]]},
    "a string loss": {"iter": 6, "loss": "1.0", "lr": 0.01},
    "a string iter": {"iter": "6", "loss": 1.0, "lr": 0.01},
    "not JSON": "{iter: 6",
}


@pytest.mark.parametrize("garbled", list(GARBLED))
def test_a_garbled_line_is_skipped_with_a_warning_and_the_rest_drawn(
    garbled, tmp_path, monkeypatch, capsys
):
    work_dir = write_log(tmp_path, [*GOOD, GARBLED[garbled]])
    summary, figures = drawn(monkeypatch, work_dir)
    assert skipped_lines(capsys.readouterr().err) == [4]
    assert summary["validation_iter"] == 4
    loss, lr, miou = figures[0].axes
    assert curve(loss) == [(2, 1.5), (4, 1.0)] and curve(lr) == [(2, 0.01), (4, 0.005)]
    assert curve(miou) == [(4, GOOD[2]["val_mIoU"])]
    with open(work_dir / "confusion.csv") as table:
        rows = list(csv.reader(table))[1:]
    assert [[int(v) for v in row[1:]] for row in rows] == GOOD[2]["val_confusion"]


def test_the_garbled_lines_are_named_in_one_warning_and_the_script_exits_0(tmp_path):
    lines = [GOOD[0], *GARBLED.values(), *GOOD[1:]]
    work_dir = write_log(tmp_path, lines)
    result = in_process("tools/plot_run.py", work_dir)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert skipped_lines(result.stderr) == list(range(2, 2 + len(GARBLED)))
    assert last_json(result.stdout)["validation_iter"] == 4


def test_a_line_cut_short_at_the_end_is_left_out_quietly(tmp_path, monkeypatch, capsys):
    """A running train.py may be halfway through its last line."""
    work_dir = write_log(tmp_path, GOOD)
    with open(work_dir / "log.jsonl", "a") as log:
        log.write('{"iter": 6, "lo')
    summary, figures = drawn(monkeypatch, work_dir)
    assert "warning" not in capsys.readouterr().err and curve(figures[0].axes[0])[-1] == (4, 1.0)


def test_a_run_shorter_than_the_log_interval_says_so_instead_of_an_empty_curve(
    tmp_path, monkeypatch
):
    work_dir = write_log(tmp_path, [GOOD[2]])
    _, figures = drawn(monkeypatch, work_dir)
    loss, lr, miou = figures[0].axes
    for axis in (loss, lr):
        assert not any(len(line.get_xdata()) == 0 for line in axis.lines)
        assert not axis.lines and not axis.axison and axis.texts, axis.get_title()
    assert curve(miou) == [(4, GOOD[2]["val_mIoU"])]


def test_a_panel_of_null_values_only_says_so(tmp_path, monkeypatch):
    """A loss that was never finite is logged as null: no line to draw."""
    work_dir = write_log(tmp_path, [{"iter": 2, "loss": None, "lr": 0.01}, GOOD[2]])
    _, figures = drawn(monkeypatch, work_dir)
    loss, lr, _ = figures[0].axes
    assert not loss.lines and not loss.axison and "null" in loss.texts[0].get_text()
    assert curve(lr) == [(2, 0.01)]


def test_a_single_point_is_drawn_as_a_mark(tmp_path, monkeypatch):
    work_dir = write_log(tmp_path, [GOOD[1], GOOD[2]])
    _, figures = drawn(monkeypatch, work_dir)
    for axis in figures[0].axes:
        (line,) = axis.lines
        assert len(line.get_xdata()) == 1 and line.get_marker() not in ("None", "", None, " ")


def test_the_confusion_colour_bar_reads_percent_as_its_cells(tmp_path, monkeypatch):
    work_dir = write_log(tmp_path, GOOD)
    _, figures = drawn(monkeypatch, work_dir)
    heat_map, colour_bar = figures[1].axes
    confusion = np.array(GOOD[2]["val_confusion"], dtype=np.float64)
    percent = 100 * confusion / confusion.sum(1, keepdims=True)
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
        for t in heat_map.texts
    }
    assert cells == {
        (row, column): f"{value:.0f}"
        for (row, column), value in np.ndenumerate(percent)
        if value >= 0.5
    }
    assert colour_bar.get_ylim() == (0, 100)
    image = heat_map.images[0]
    assert np.allclose(image.get_array(), percent) and image.get_clim() == (0, 100)
