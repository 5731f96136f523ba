"""What the tests share: the repository root, the synthetic datasets, the model that learned, a
user's own dataset and checkpoint, the checks of a script's last line (its JSON summary, or its
one-line error) and of the user's files (hashes, hidden files)."""

import contextlib
import hashlib
import importlib
import io
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from bisenet import BiSeNetV1, ModelConfig
from interop import folder_info
from synthetic import synthesize_folder, trainable_cityscapes

ROOT = Path(__file__).resolve().parents[1]


def in_process(script, *args):
    """`python script args` run in this interpreter through the script's main(argv), as a finished
    process: exit code, stdout, stderr (an uncaught exception is exit code 1 with its traceback, as
    in a real run). A fresh interpreter costs seconds of `import torch` each; tests that need one
    (signals, environment, torchrun) start one."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    main = importlib.import_module(Path(script).stem).main
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001  (what the interpreter would print before exiting with 1)
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(
        [script, *map(str, args)], code, out.getvalue(), err.getvalue()
    )


def succeeded(script, *args):
    """The stdout of in_process(script, *args), which must have exited with 0."""
    result = in_process(script, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def last_json(stdout):
    """The JSON line every script ends with."""
    return json.loads(stdout.strip().splitlines()[-1])


def one_line_error(result, code=2):
    """The error line of a finished process that must have failed with `code`, one line and no
    traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def in_process_error(main, argv, capsys, *, allow_warnings=False):
    """The error line of a script's main(argv) run in this process: exit 2 and exactly one line on
    stderr (besides `warning:` lines where allowed), without a traceback."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = [
        line
        for line in err.strip().splitlines()
        if not (allow_warnings and line.startswith("warning:"))
    ]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def in_process_summary(main, argv, capsys):
    """The JSON summary of a script's main(argv) run in this process."""
    main([str(a) for a in argv])
    return last_json(capsys.readouterr().out)


def wait_for(condition, run, what, timeout=900):
    """Polls `condition()` until it holds while `run` (a Popen) is running. Fails the test naming
    `what` if the run ends first, or after `timeout` seconds: a hung run's safety net, never a wait
    that a loaded machine could outlast and then go on as if the event had happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run.poll() is not None:
            stderr = run.communicate()[1] if run.stderr else ""
            pytest.fail(f"the run ended (exit {run.returncode}) before {what}: {stderr[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def digest(*paths):
    """{file: sha256} of every file at or below the paths."""
    files = [
        p
        for path in map(Path, paths)
        for p in ([path] if path.is_file() else sorted(path.rglob("*")))
        if p.is_file()
    ]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def hidden_files(folder):
    return sorted(p.name for p in Path(folder).rglob(".*"))


def copy_of(root, tmp_path, name="data"):
    return Path(shutil.copytree(root, tmp_path / name))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic Cityscapes with labelTrainIds and split lists. Tests must not modify it."""
    root = tmp_path_factory.mktemp("cityscapes")
    return trainable_cityscapes(root, train=9, val=4, test=2, height=128, width=256, seed=5)


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """R18 trained from scratch for 150 iterations on a synthetic Cityscapes of its own (minutes of
    CPU time): (data root, work dir, the finished train.py process). test_train checks the learning,
    test_deploy exports it."""
    root = tmp_path_factory.mktemp("learned")
    trainable_cityscapes(root / "data", train=24, val=6, height=128, width=256, seed=11)
    args = [
        "--data-root",
        root / "data",
        "--work-dir",
        root / "wd",
        "--depth",
        "18",
        "--batch-size",
        "8",
        "--crop",
        "128x256",
        "--scale-range",
        "0.75,1.5",
    ]
    args += [
        "--iters",
        "150",
        "--lr",
        "0.05",
        "--warmup-iters",
        "20",
        "--val-interval",
        "50",
        "--log-interval",
        "10",
        "--workers",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "data", root / "wd", result


@pytest.fixture(scope="module")
def my7(tmp_path_factory):
    """A user's own 7-class dataset in mmseg's layout (val in two scene folders) and a 7-class
    checkpoint that describes its classes: (data root, checkpoint)."""
    root = synthesize_folder(
        tmp_path_factory.mktemp("data") / "my7",
        classes=7,
        train=4,
        val=2,
        test=1,
        height=64,
        width=128,
        seed=3,
    )
    torch.manual_seed(0)
    model = BiSeNetV1(ModelConfig(18, 7))
    ckpt = root.parent / "m7.pth"
    torch.save(
        {
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "dataset": folder_info(root).to_dict(),
        },
        ckpt,
    )
    return root, ckpt


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items):
    """A test that uses the learned model waits for its training (minutes): slow, wherever it is."""
    for item in items:
        if "learned" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
