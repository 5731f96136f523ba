"""The launch scripts train what the README's recipe table says: each script's command (DRY_RUN=1)
read by train.py's own parser on that many devices (its RECIPES), against the table's cells."""

import json
import math
import os
import re
import shlex
import subprocess
from unittest import mock

import pytest
from conftest import ROOT

from train import parse_args


def readme_recipes():
    """{recipe name: {column: cell}} of the README's recipe table; 'same' cells repeat the row
    above."""
    lines = (ROOT / "README.md").read_text().splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("| recipe | context path |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows, previous = {}, None
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        if previous:
            cells = {k: previous[k] if v == "same" else v for k, v in cells.items()}
        rows[cells["recipe"]], previous = cells, cells
    return rows


def launched(script, **env):
    """train.py's parsed arguments of a launch script's command on the devices it starts, and their
    number; the settings the script prints are those."""
    result = subprocess.run(
        ["bash", script, "full"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", "DEVICE": "cpu", **env},
    )
    assert result.returncode == 0, result.stderr
    command, printed = result.stdout.strip().splitlines()[-2:]
    words = shlex.split(command)
    nproc = int(words[words.index("--nproc-per-node") + 1]) if "--nproc-per-node" in words else 1
    with mock.patch.dict(os.environ, {"WORLD_SIZE": str(nproc)}):
        args = parse_args(words[words.index("train.py") + 1 :])
    assert all(
        getattr(args, name) == (tuple(value) if isinstance(value, list) else value)
        for name, value in json.loads(printed).items()
    )
    return args, nproc


def count(text):
    """'8 x 8' -> 64, '16' -> 16, '40k' -> 40000, '1k' -> 1000."""
    return math.prod(
        int(float(v[:-1]) * 1000) if v.endswith("k") else int(v) for v in text.split(" x ")
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, script, env",
    [
        ("Ascend ModelZoo (= mmseg 0.x config)", "run_8p.sh", {}),
        ("Ascend ModelZoo (= mmseg 0.x config)", "run_8p.sh", {"NPROC": "4"}),
        ("Ascend ModelZoo (= mmseg 0.x config)", "run_1p.sh", {}),
        ("R18 (mmseg)", "run_8p.sh", {"DEPTH": "18"}),
        ("R18 (mmseg)", "run_8p.sh", {"DEPTH": "18", "NPROC": "2"}),
        ("R18 (mmseg)", "run_1p.sh", {"DEPTH": "18"}),
    ],
)
def test_each_launch_script_trains_the_readme_recipe(recipe, script, env):
    row = readme_recipes()[recipe]
    args, devices = launched(script, **env)
    images = args.batch_size * devices
    assert f"ResNet-{args.depth}, from scratch" == row["context path"] and args.pretrained is None
    if recipe.startswith("R18"):
        assert images == count(row["images"])  # mmseg's R18: the same 16 images on any device count
    assert math.isclose(
        args.lr, float(row["lr"]) * images / count(row["images"])
    )  # linear scaling, as the recipe's own
    assert args.iters == count(row["iterations"])
    warmup = re.fullmatch(
        r"linear warmup (\S+) from (\S+)x, poly (\S+) to (\S+), SGD m (\S+) wd (\S+)",
        row["schedule"],
    ).groups()
    assert (args.warmup, args.warmup_iters, args.warmup_ratio) == (
        "linear",
        count(warmup[0]),
        float(warmup[1]),
    )
    assert (args.poly_power, args.min_lr, args.momentum, args.weight_decay) == tuple(
        float(v) for v in warmup[2:]
    )
    assert row["loss"] == f"CE main + 2 aux (weight {args.aux_weight:g})" and args.loss == "ce"
    assert row["precision"] == f"AMP {args.amp}"


@pytest.mark.parametrize(
    "earlier, recipe, row",
    [
        ("seed_r50", "ascend_r50", "Ascend ModelZoo (= mmseg 0.x config)"),
        ("r18", "mmseg_r18", "R18 (mmseg)"),
    ],
)
def test_the_recipes_earlier_names_still_train_the_readme_recipe(earlier, recipe, row):
    """Launch scripts and notes written before the recipes were named after their sources."""
    cells = readme_recipes()[row]
    with mock.patch.dict(os.environ, {"WORLD_SIZE": "1"}):
        args = parse_args(["--recipe", earlier])
    assert args.recipe == recipe
    assert f"ResNet-{args.depth}, from scratch" == cells["context path"]
    assert math.isclose(args.lr, float(cells["lr"]) * args.batch_size / count(cells["images"]))
    assert args.iters == count(cells["iterations"])
