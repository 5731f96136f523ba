"""Windows: train -> resume -> evaluate in an interpreter that lacks what Windows lacks
(tests/windows_stand_in: no fcntl, no SIGUSR1, no symbolic links for an ordinary user, no
os.fchmod, spawn only)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from test_train import SMALL

STAND_IN = ROOT / "tests" / "windows_stand_in"


def run_like_windows(*argv):
    environment = {**os.environ, "PYTHONPATH": str(STAND_IN)}
    command = [sys.executable, *map(str, argv)]
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_resume_and_evaluate_where_windows_lacks_posix(synthetic_root, tmp_path):
    probe = "import fcntl, signal, os; print(hasattr(signal, 'SIGUSR1'), hasattr(os, 'fchmod'))"
    assert run_like_windows("-c", probe).returncode != 0  # the stand-in hides fcntl
    work_dir = tmp_path / "wd"
    base = ["train.py", "--data-root", synthetic_root, "--work-dir", work_dir, *SMALL]
    base += ["--no-validate", "--ckpt-interval", "2", "--workers", "2"]
    first = run_like_windows(*base, "--iters", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    latest = work_dir / "latest.pth"
    assert not latest.is_symlink() and os.path.samefile(
        latest, work_dir / "iter_2.pth"
    )  # a hard link
    second = run_like_windows(*base, "--iters", "4", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    assert json.loads(second.stdout.strip().splitlines()[-1])["iters"] == 4
    assert os.path.samefile(latest, work_dir / "iter_4.pth")
    scored = run_like_windows(
        "evaluate.py", "--ckpt", latest, "--data-root", synthetic_root, "--workers", "0"
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "mIoU" in json.loads(scored.stdout.strip().splitlines()[-1])
