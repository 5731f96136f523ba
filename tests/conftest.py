import os
import subprocess
import sys
from pathlib import Path

import pytest

from cityscapes import synthesize
from convert_labels import convert_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic Cityscapes with labelTrainIds and split lists. Tests must not modify it."""
    root = tmp_path_factory.mktemp("cityscapes")
    synthesize(root, train=9, val=4, test=2, height=128, width=256, seed=5)
    assert not convert_dataset(root, source="labelIds", progress=False)
    return root


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """R18 trained from scratch for 150 iterations on a synthetic Cityscapes of its own (about a CPU minute):
    (data root, work dir, the finished train.py process). test_train checks the learning, test_deploy exports it."""
    root = tmp_path_factory.mktemp("learned")
    synthesize(root / "data", train=24, val=6, height=128, width=256, seed=11)
    convert_dataset(root / "data", source="labelIds", progress=False)
    args = ["--data-root", root / "data", "--work-dir", root / "wd", "--depth", "18", "--batch-size", "8", "--crop", "128x256", "--scale-range", "0.75,1.5"]
    args += ["--iters", "150", "--lr", "0.05", "--warmup-iters", "20", "--val-interval", "50", "--log-interval", "10", "--workers", "1"]
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data", root / "wd", result
