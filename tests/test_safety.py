"""Never lose a run: every case first sets up the failure it guards against, then checks exit code,
one-line error, that no checkpoint was overwritten or lost (hashes before and after) and that no
temp file was left."""

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    in_process_error,
    in_process_summary,
    last_json,
    one_line_error,
    wait_for,
)
from PIL import Image
from test_train import SMALL, run_train

import evaluate
import export
import train
from benchmark import free_port
from checkpoints import load_model

QUICK = [*SMALL, "--no-validate", "--warmup-iters", "0", "--lr", "0.01"]


def hashes(work_dir):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(work_dir).glob("*.pth"))
        if p.is_file()
    }


def temp_files(work_dir):
    return sorted(p.name for p in Path(work_dir).glob(".*.tmp"))


def in_small_filesystem(mount_point, size_mb, command, read_only=False):
    """Runs `command` (argv) with a tmpfs of size_mb mounted at mount_point, in a private mount
    namespace."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (",ro" if read_only else "")
    script = f'mount -t tmpfs -o {options} tmpfs "{mount_point}" && exec "$@"'
    cmd = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "bash",
        "-c",
        script,
        "bash",
        *command,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def interruptible(cmd, **kw):
    """Popen with Ctrl-C's default action restored: a shell's background job inherits SIGINT
    ignored."""
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore,
        **kw,
    )


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    """A finished 3-iteration run with a checkpoint per iteration; tests copy it before changing
    anything."""
    work_dir = tmp_path_factory.mktemp("run") / "wd"
    result = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "3",
            "--ckpt-interval",
            "1",
            "--work-dir",
            str(work_dir),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir


def copy_run(finished_run, tmp_path):
    work_dir = tmp_path / "wd"
    shutil.copytree(finished_run, work_dir, symlinks=True)
    return work_dir


# 1. resume never starts over ----------------------------------------------------------------------
@pytest.mark.slow
def test_dangling_latest_resumes_from_the_newest_complete_checkpoint(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    (work_dir / "iter_3.pth").unlink()  # latest.pth -> iter_3.pth now dangles
    before = hashes(work_dir)
    result = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "3",
            "--ckpt-interval",
            "1",
            "--work-dir",
            str(work_dir),
            "--resume",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {(work_dir / 'iter_2.pth').resolve()} at iteration 2" in result.stdout
    assert (
        "latest.pth points to iter_3.pth, which is missing: resuming from iter_2.pth, the "
        "newest complete checkpoint" in result.stdout
    )
    assert {k: v for k, v in hashes(work_dir).items() if k in before} == before
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] == 3
    reference = torch.load(finished_run / "iter_3.pth", weights_only=True)["model"]
    for key, value in torch.load(work_dir / "iter_3.pth", weights_only=True)["model"].items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.slow
def test_without_resume_an_earlier_run_is_never_overwritten(synthetic_root, finished_run, tmp_path):
    work_dir = copy_run(finished_run, tmp_path)
    before = hashes(work_dir)
    last = one_line_error(
        run_train(
            [
                "--data-root",
                str(synthetic_root),
                *QUICK,
                "--iters",
                "3",
                "--work-dir",
                str(work_dir),
            ]
        )
    )
    assert (
        "holds the checkpoints of a run (iter_1.pth, iter_2.pth, iter_3.pth, latest.pth -> "
        "iter_3.pth); pass --resume" in last
    )
    assert hashes(work_dir) == before


@pytest.mark.slow
def test_a_run_without_iteration_checkpoints_is_not_restarted(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    shutil.copy(work_dir / "iter_1.pth", work_dir / "best.pth")
    for n in (1, 2, 3):
        (work_dir / f"iter_{n}.pth").unlink()
    before = hashes(work_dir)
    last = one_line_error(
        run_train(
            [
                "--data-root",
                str(synthetic_root),
                *QUICK,
                "--iters",
                "3",
                "--work-dir",
                str(work_dir),
                "--resume",
            ]
        )
    )
    assert (
        "holds a run (best.pth, latest.pth -> iter_3.pth (missing)) but no iter_N.pth to resume "
        "from" in last
    )
    assert hashes(work_dir) == before


def damage(work_dir, kind):
    newest = work_dir / "iter_3.pth"
    if kind == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif kind == "empty":
        newest.write_bytes(b"")
    elif kind == "weights only":
        checkpoint = torch.load(newest, weights_only=True)
        torch.save(
            {"model_config": checkpoint["model_config"], "model": checkpoint["model"]}, newest
        )
    elif kind == "text":
        (work_dir / "latest.pth").unlink()
        (work_dir / "latest.pth").write_text("iter_3.pth\n")
    elif kind == "directory":
        (work_dir / "latest.pth").unlink()
        (work_dir / "latest.pth").mkdir()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "iter_3.pth: not a loadable PyTorch checkpoint"),
        ("empty", "iter_3.pth: not a loadable PyTorch checkpoint"),
        ("weights only", "iter_3.pth: not a training checkpoint of train.py"),
        ("text", "latest.pth: expected the link train.py writes, found a file"),
        ("directory", "latest.pth: expected the link train.py writes, found a directory"),
    ],
)
def test_a_damaged_resume_point_is_named_in_one_line(
    synthetic_root, finished_run, tmp_path, kind, message
):
    work_dir = copy_run(finished_run, tmp_path)
    damage(work_dir, kind)
    before = hashes(work_dir)
    last = one_line_error(
        run_train(
            [
                "--data-root",
                str(synthetic_root),
                *QUICK,
                "--iters",
                "4",
                "--work-dir",
                str(work_dir),
                "--resume",
            ]
        )
    )
    assert message in last
    if kind in ("truncated", "empty", "weights only"):
        assert "move it away to resume from iter_2.pth" in last
    assert hashes(work_dir) == before and not temp_files(work_dir)


@pytest.mark.slow
def test_resume_with_other_settings_warns_with_the_differences(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    args = [
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "4",
        "--work-dir",
        str(work_dir),
        "--resume",
        "--lr",
        "0.02",
        "--crop",
        "64x96",
    ]
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "warning: resuming with settings that differ from the run's: --crop 64x96 (was 64x128), "
        "--iters 4 (was 3), --lr 0.02 (was 0.01)" in result.stdout
    )


@pytest.mark.slow
def test_a_work_dir_and_an_export_of_the_previous_version_go_on_unchanged(
    synthetic_root, finished_run, tmp_path, capsys
):
    """Before the recipes table and the one ignore value, checkpoints saved `dataset.ignore_index`
    and flags without `recipe`; exported models recorded the same dataset dict. Both must still
    resume, score and describe."""
    work_dir = copy_run(finished_run, tmp_path)
    for path in work_dir.glob("iter_*.pth"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["dataset"]["ignore_index"] = 255
        checkpoint["args"] = {
            k: v for k, v in checkpoint["args"].items() if k not in ("recipe", "print_recipe")
        }
        torch.save(checkpoint, path)
    resumed = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "4",
            "--work-dir",
            str(work_dir),
            "--resume",
        ]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and last_json(resumed.stdout)["iters"] == 4
    assert (
        "settings that differ from the run's: --iters 4 (was 3)\n" in resumed.stdout
    )  # the one real difference
    scored = in_process_summary(
        evaluate.main,
        ["--ckpt", work_dir / "iter_3.pth", "--data-root", synthetic_root, "--workers", "0"],
        capsys,
    )
    assert scored["dataset"] == "cityscapes" and 0 <= scored["mIoU"] <= 100
    import deploy

    metadata = {
        **export.export_metadata(
            *load_model(work_dir / "iter_3.pth"), size=(64, 128), precision="fp32", source="x"
        )
    }
    metadata["dataset"] = {**metadata["dataset"], "ignore_index": 255}
    assert deploy.DatasetInfo.from_dict(metadata["dataset"]).class_names == tuple(
        scored["per_class"]
    )


@pytest.mark.slow
def test_a_run_begun_under_an_earlier_recipe_name_resumes_under_it(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    for path in work_dir.glob("iter_*.pth"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["args"]["recipe"] = "seed_r50"  # what `--recipe seed_r50` saved
        torch.save(checkpoint, path)
    again = ["--data-root", str(synthetic_root), *QUICK, "--work-dir", str(work_dir), "--resume"]
    resumed = run_train([*again, "--recipe", "seed_r50", "--iters", "4"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and last_json(resumed.stdout)["iters"] == 4
    assert "settings that differ from the run's: --iters 4 (was 3)\n" in resumed.stdout


# 2. only finite weights are saved -----------------------------------------------------------------
@pytest.mark.slow
def test_a_step_that_makes_the_weights_non_finite_is_never_saved(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    before = hashes(work_dir)
    args = [
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "5",
        "--ckpt-interval",
        "1",
        "--work-dir",
        str(work_dir),
        "--resume",
    ]
    # weight decay x lr overflows fp32 in the update: the loss of that iteration was still finite
    last = one_line_error(
        run_train([*args, "--amp", "O0", "--lr", "1e38", "--weight-decay", "1e3", "--min-lr", "0"])
    )
    assert (
        "the weights hold NaN or inf after iteration 4" in last
        and "iter_4.pth was not written" in last
    )
    assert f"The last good checkpoint is kept: {work_dir / 'iter_3.pth'}" in last
    assert hashes(work_dir) == before and not temp_files(work_dir)


# 3. one training process per work dir -------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_on_a_work_dir_in_use_stops_at_once(synthetic_root, tmp_path):
    work_dir = tmp_path / "wd"
    args = [
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "400",
        "--ckpt-interval",
        "1",
        "--keep-checkpoints",
        "3",
        "--work-dir",
        str(work_dir),
    ]
    first = interruptible([sys.executable, "train.py", *args])
    try:
        wait_for((work_dir / "iter_2.pth").exists, first, "iter_2.pth")
        second = run_train([*args, "--resume"])
        last = one_line_error(second)
        assert (
            f"{work_dir} is in use by train.py pid {first.pid} on " in last
            and "pass another --work-dir" in last
        )
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in stderr
    for name in [name for name in hashes(work_dir) if name.startswith("iter_")]:
        checkpoint = torch.load(work_dir / name, weights_only=True)
        assert checkpoint["iteration"] == int(name[5:-4]) and checkpoint["args"]["iters"] == 400
    assert not temp_files(work_dir)


@pytest.mark.slow
def test_temp_names_are_unique_and_leftovers_of_killed_runs_are_removed(
    synthetic_root, finished_run, tmp_path
):
    work_dir = copy_run(finished_run, tmp_path)
    leftover = work_dir / ".iter_4.pth.x1y2z3.tmp"
    leftover.write_bytes(b"half a checkpoint")
    result = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "4",
            "--work-dir",
            str(work_dir),
            "--resume",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "removed .iter_4.pth.x1y2z3.tmp, left by a run that was killed while writing"
        in result.stdout
    )
    assert not temp_files(work_dir)


@pytest.mark.slow
def test_sigint_ends_with_one_line_and_leaves_no_temp_files(synthetic_root, tmp_path):
    work_dir = tmp_path / "wd"
    args = [
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "400",
        "--ckpt-interval",
        "1",
        "--keep-checkpoints",
        "3",
        "--work-dir",
        str(work_dir),
    ]
    run = interruptible([sys.executable, "train.py", *args])
    # latest.pth, not iter_3.pth: a SIGINT between writing iter_N.pth and relinking latest.pth
    # leaves the link one behind, by design
    # (test_dangling_latest_resumes_from_the_newest_complete_checkpoint)
    wait_for(lambda: linked_iteration(work_dir) >= 3, run, "latest.pth -> iter_3.pth")
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    last = one_line_error(
        subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), code=130
    )
    assert (
        last.startswith("error: interrupted at iteration ")
        and "Run the same command with --resume to continue." in last
    )
    assert not temp_files(work_dir)
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] >= 3


def linked_iteration(work_dir):
    """N of the iter_N.pth that latest.pth points to, 0 before the first."""
    latest = work_dir / "latest.pth"
    return (
        int(os.readlink(latest).removeprefix("iter_").removesuffix(".pth"))
        if latest.is_symlink()
        else 0
    )


# 4. full disks ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(synthetic_root, tmp_path):
    mount = tmp_path / "small"
    work_dir = mount / "wd"
    args = [
        sys.executable,
        "train.py",
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--iters",
        "3",
        "--ckpt-interval",
        "1",
        "--work-dir",
        str(work_dir),
    ]
    # an R18 checkpoint with momentum is about 103 MB: the first fits in 160 MB, the second does not
    result = in_small_filesystem(
        mount, 160, ["bash", "-c", " ".join(args) + f'; code=$?; ls -a "{work_dir}"; exit $code']
    )
    last = one_line_error(result)
    assert (
        f"no space left on {work_dir} (needs about 103 MB, " in last
        and "free some space and resume" in last
    ), last
    listing = result.stdout.split()
    assert (
        "iter_1.pth" in listing
        and "iter_2.pth" not in listing
        and not [name for name in listing if name.endswith(".tmp")]
    ), listing


@pytest.mark.slow
def test_a_write_that_runs_out_of_space_deletes_its_partial_file(tmp_path):
    mount = tmp_path / "small"
    script = f"""
import torch, sys
sys.path.insert(0, {str(ROOT)!r})
from workdir import WorkDirError, atomic_save
from pathlib import Path
target = Path({str(mount)!r}) / "iter_1.pth"
atomic_save({{"weights": torch.ones(1000)}}, target)
before = target.read_bytes()
# 12 MB behind a 40-byte view: the estimate passes, the write cannot
storage = torch.zeros(3 * 2**20)
try:
    atomic_save({{"weights": storage[:10]}}, target)
except WorkDirError as e:
    print("ERROR", e)
left = sorted(p.name for p in target.parent.iterdir())
print("KEPT", target.read_bytes() == before, "LEFT", left)
"""
    result = in_small_filesystem(mount, 8, [sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ERROR no space left on {mount} (needs about 1 MB, " in result.stdout
    assert "KEPT True LEFT ['iter_1.pth']" in result.stdout


@pytest.mark.slow
def test_keep_checkpoints_prunes_the_oldest(synthetic_root, tmp_path):
    work_dir = tmp_path / "wd"
    result = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "4",
            "--ckpt-interval",
            "1",
            "--keep-checkpoints",
            "2",
            "--work-dir",
            str(work_dir),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(hashes(work_dir)) == ["iter_3.pth", "iter_4.pth", "latest.pth"]
    assert "removed iter_2.pth (--keep-checkpoints 2)" in result.stdout


# 5. many machines ---------------------------------------------------------------------------------
def rank_pid(marker, rank):
    """The pid of the train.py process of `rank` whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (
            b"train.py" in b" ".join(cmdline)
            and marker.encode() in b" ".join(cmdline)
            and f"RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_elastic_restart_after_kill_9_of_a_rank_is_bit_exact(synthetic_root, tmp_path):
    """run_8p.sh with 2 gloo processes: kill -9 rank 1 mid-run; torchrun restarts the group from the
    newest checkpoint by itself, and the final weights equal those of an uninterrupted run bit for
    bit."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DATA_ROOT": str(synthetic_root),
        "NPROC": "2",
        "DIST_BACKEND": "gloo",
    }
    args = ["perf", *QUICK, "--iters", "10", "--ckpt-interval", "1"]
    straight = subprocess.run(
        ["bash", "run_8p.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "WORK_DIR": str(tmp_path / "a"), "MASTER_PORT": str(free_port())},
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    work_dir = tmp_path / "b"
    run = subprocess.Popen(
        ["bash", "run_8p.sh", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "WORK_DIR": str(work_dir), "MASTER_PORT": str(free_port())},
        start_new_session=True,
    )
    try:
        wait_for((work_dir / "iter_3.pth").exists, run, "iter_3.pth")
        victim = rank_pid(str(work_dir), 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, stderr[-3000:]
    assert f"(exitcode: -9) local_rank: 1 (pid: {victim})" in stderr
    assert "resumed from" in stdout and last_json(stdout)["iters"] == 10
    a = torch.load(tmp_path / "a" / "iter_10.pth", weights_only=True)
    b = torch.load(work_dir / "iter_10.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.slow
def test_a_rank_that_never_starts_ends_in_a_bounded_time(synthetic_root, tmp_path):
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    env.update(DIST_BACKEND="gloo", DIST_TIMEOUT="5")
    start = time.time()
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "1",
            "--work-dir",
            str(tmp_path / "wd"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    last = one_line_error(result)
    assert (
        "rank 0: the process group of 2 did not form within 5 s" in last
        and "DIST_TIMEOUT sets the wait" in last
    )
    assert time.time() - start < 60


# 6. legal data that used to give a wrong number or a stuck run ------------------------------------
def labels_set_to_ignore(synthetic_root, tmp_path, split):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for label in (root / "gtFine" / split).rglob("*_labelTrainIds.png"):
        Image.fromarray(np.full_like(np.array(Image.open(label)), 255)).save(label)
    return root


def strict_json_lines(path):
    """log.jsonl as JSON lines that any parser reads: NaN or Infinity would be an error here."""
    return [
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {path}"))
        for line in Path(path).read_text().splitlines()
    ]


@pytest.mark.slow
def test_batches_without_labelled_pixels_train_nothing_and_are_counted(synthetic_root, tmp_path):
    """Every training label 255: before, CE over no labelled pixel was NaN and every resume stopped
    at that batch."""
    root = labels_set_to_ignore(synthetic_root, tmp_path, "train")
    result = run_train(
        [
            "--data-root",
            str(root),
            *QUICK,
            "--iters",
            "3",
            "--ckpt-interval",
            "1",
            "--work-dir",
            str(tmp_path / "wd"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout)["unlabelled_batches"] == 3
    entries = strict_json_lines(tmp_path / "wd" / "log.jsonl")
    assert [e["iter"] for e in entries if e.get("unlabelled_batch")] == [1, 2, 3] and all(
        e["loss"] == 0 for e in entries if "loss" in e
    )


@pytest.mark.slow
def test_a_validation_without_labelled_pixels_is_said_and_never_the_best(synthetic_root, tmp_path):
    root = labels_set_to_ignore(synthetic_root, tmp_path, "val")
    args = [
        "--data-root",
        str(root),
        *SMALL,
        "--warmup-iters",
        "0",
        "--iters",
        "2",
        "--val-interval",
        "1",
        "--work-dir",
        str(tmp_path / "wd"),
    ]
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "iter 1: val mIoU undefined: no val pixel is labelled, so it is never a best, no best yet"
        in result.stdout
    )
    summary = last_json(result.stdout)
    assert (
        summary["mIoU"] is None
        and summary["best_mIoU"] is None
        and not (tmp_path / "wd" / "best.pth").exists()
    )
    assert [
        e["val_mIoU"] for e in strict_json_lines(tmp_path / "wd" / "log.jsonl") if "val_mIoU" in e
    ] == [None, None]


@pytest.mark.slow
def test_resume_with_iters_below_the_run_is_refused_and_equal_says_complete(
    synthetic_root, finished_run, tmp_path, capsys
):
    work_dir = copy_run(finished_run, tmp_path)
    base = ["--data-root", str(synthetic_root), *QUICK, "--work-dir", str(work_dir), "--resume"]
    last = in_process_error(train.main, [*base, "--iters", "2"], capsys)
    assert last == (
        f"error: --iters 2: the run in {work_dir} is at iteration 3 already; pass --iters "
        "above 3 to train on"
    )
    complete = run_train([*base, "--iters", "3"])
    assert (
        complete.returncode == 0
        and "at iteration 3: it is complete, nothing to train" in complete.stdout
    )


@pytest.mark.slow
def test_convert_labels_on_a_read_only_root_is_one_line(tmp_path):
    """A Cityscapes root mounted read-only: before, 29 lines and the per-file failures it had
    collected, never shown."""
    from synthetic import synthesize_cityscapes

    root = synthesize_cityscapes(tmp_path / "data", train=1, val=1, height=64, width=128)
    script = f'mount --bind "{root}" "{root}" && mount -o remount,ro,bind "{root}" && exec "$@"'
    command = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "bash",
        "-c",
        script,
        "bash",
        sys.executable,
        "convert_labels.py",
        str(root),
    ]
    last = one_line_error(subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
    assert last == (
        f"error: {root}: not writable (a read-only mount?); the labels and split lists are "
        "written beside the data: convert a writable copy"
    )


@pytest.mark.slow
def test_out_of_memory_on_a_huge_image_is_one_line(synthetic_root, finished_run, tmp_path):
    """--images with one 8000x8000 photo in a process whose memory is capped: one line that says
    what to lower."""
    import cv2

    cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((8000, 8000, 3), np.uint8))
    cap = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << "
        "30)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    command = [
        sys.executable,
        "-c",
        cap,
        "evaluate.py",
        "--ckpt",
        str(finished_run / "iter_3.pth"),
        "--images",
        str(tmp_path / "huge.png"),
    ]
    result = subprocess.run(
        [*command, "--out-dir", str(tmp_path / "out"), "--amp", "O0", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = one_line_error(result, code=1)
    assert last.startswith("error: out of memory (") and last.endswith(
        "lower --batch-size or --crop, or use --mode slide for very large images"
    )


@pytest.mark.slow
def test_a_resumed_run_keeps_log_jsonl_valid_and_logs_each_iteration_once(
    synthetic_root, finished_run, tmp_path
):
    """A run killed after iteration 3 but resumed from iter_2.pth replays iteration 3: its old line
    goes, as does a last line a full disk cut short; every line stays JSON."""
    work_dir = copy_run(finished_run, tmp_path)
    (work_dir / "iter_3.pth").unlink()
    with open(work_dir / "log.jsonl", "a") as log:
        log.write('{"iter": 3, "loss": 1.5, "lr"')
    result = run_train(
        [
            "--data-root",
            str(synthetic_root),
            *QUICK,
            "--iters",
            "4",
            "--work-dir",
            str(work_dir),
            "--resume",
        ]
    )
    assert result.returncode == 0 and "at iteration 2" in result.stdout, result.stderr[-3000:]
    logged = [e["iter"] for e in strict_json_lines(work_dir / "log.jsonl") if "loss" in e]
    assert logged == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_full_disk_at_log_time_is_one_line(synthetic_root, tmp_path):
    mount = tmp_path / "small"
    train_cmd = (
        f"{sys.executable} train.py --data-root {synthetic_root} {' '.join(QUICK)} --iters 400 "
        f"--ckpt-interval 1000 --work-dir {mount / 'wd'}"
    )
    fill = (
        f'python -c "import os; os.makedirs(\\"{mount}/wd\\"); open(\\"{mount}/fill\\", '
        '\\"wb\\").write(bytes(2 * 2**20 - 6000))"'
    )
    last = one_line_error(in_small_filesystem(mount, 2, ["bash", "-c", f"{fill} && {train_cmd}"]))
    assert last.startswith(
        f"error: {mount / 'wd'}: cannot write the run's log (No space left on device); free "
        "some space"
    ), last


@pytest.mark.slow
def test_a_full_disk_at_log_time_keeps_the_iteration_reached_when_a_checkpoint_fits(
    synthetic_root, tmp_path
):
    """TensorBoard's folder on a full filesystem, the work dir on one with room: the step the run
    reached is saved (not the last periodic checkpoint, 1000 iterations away), and the same command
    with --resume goes on from it."""
    mount, work_dir = tmp_path / "small", tmp_path / "wd"
    work_dir.mkdir()
    (work_dir / "tb").symlink_to(mount)
    train = [
        sys.executable,
        "train.py",
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--ckpt-interval",
        "1000",
        "--work-dir",
        str(work_dir),
    ]
    fill = f'python -c "open(\\"{mount}/fill\\", \\"wb\\").write(bytes(2 * 2**20 - 6000))"'
    last = one_line_error(
        in_small_filesystem(mount, 2, ["bash", "-c", f"{fill} && {' '.join(train)} --iters 2000"])
    )
    assert last.startswith(
        f"error: {work_dir}: cannot write the run's log (No space left on device); free some "
        "space, then run the same command with --resume"
    )
    (saved,) = sorted(work_dir.glob("iter_*.pth"))
    reached = torch.load(saved, weights_only=True)["iteration"]
    assert (
        saved.name == f"iter_{reached}.pth"
        and 0 < reached < 1000
        and last.endswith(f"The last good checkpoint is kept: {saved}")
    )
    (work_dir / "tb").unlink()
    resumed = run_train(train[2:] + ["--iters", str(reached + 1), "--resume"])
    assert resumed.returncode == 0 and f"at iteration {reached}" in resumed.stdout, resumed.stderr[
        -3000:
    ]
