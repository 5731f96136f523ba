"""Stopping a run from outside: SIGTERM and SIGUSR1 (preemption) save the iteration reached and the
run resumes bit-exactly; a rank's error that a restart would repeat stops the group once; a killed
loader worker is one line. Real processes, real signals: one process and run_8p.sh with 2 gloo
ranks."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, one_line_error, wait_for
from test_safety import QUICK, rank_pid, temp_files
from test_train import run_train

from benchmark import free_port


def logged_iteration(work_dir):
    """The newest iteration in log.jsonl (log-interval 1: every finished step), 0 before the
    first."""
    log = Path(work_dir) / "log.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return max((e["iter"] for e in entries if "loss" in e), default=0)


def wait_for_step(run, work_dir, step):
    wait_for(lambda: logged_iteration(work_dir) >= step, run, f"step {step} in {work_dir}")


@dataclasses.dataclass
class Stopped:
    reached: int  # the iteration logged when the signal was sent
    seconds: float  # from the signal to the exit
    stdout: str
    stderr: str


def stop_with(run, signum, work_dir, after, grace=60):
    """Sends `signum` once `after` steps are logged, and waits for the exit."""
    wait_for_step(run, work_dir, after)
    reached, sent = logged_iteration(work_dir), time.perf_counter()
    os.kill(run.pid, signum)
    stdout, stderr = run.communicate(timeout=grace)
    return Stopped(reached, time.perf_counter() - sent, stdout, stderr)


def assert_same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["iteration"] == b["iteration"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.slow
def test_sigterm_saves_the_iteration_it_reached_and_the_resumed_run_is_bit_exact(
    synthetic_root, tmp_path
):
    """What SLURM, Kubernetes and spot instances send before SIGKILL: one line, exit 143, a
    checkpoint of the iteration reached (the step in flight finishes), within seconds; resuming ends
    where an uninterrupted run does."""
    args = ["--data-root", str(synthetic_root), *QUICK, "--iters", "40", "--ckpt-interval", "1000"]
    straight = run_train([*args, "--work-dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    work_dir = tmp_path / "b"
    run = subprocess.Popen(
        [sys.executable, "train.py", *args, "--work-dir", str(work_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = stop_with(run, signal.SIGTERM, work_dir, after=5)
    reached, seconds = stopped.reached, stopped.seconds
    stdout, stderr = stopped.stdout, stopped.stderr
    last = one_line_error(
        subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), code=143
    )
    saved = torch.load(work_dir / "latest.pth", weights_only=True)["iteration"]
    assert last == (
        f"error: stopped by SIGTERM after iteration {saved}; saved "
        f"{work_dir / f'iter_{saved}.pth'}; run the same command with --resume (the launch "
        "scripts do) to continue"
    )
    assert reached <= saved <= reached + 1 and seconds < 30, (reached, saved, seconds)
    assert not temp_files(work_dir)
    resumed = run_train([*args, "--work-dir", str(work_dir), "--resume"])
    assert resumed.returncode == 0 and f"at iteration {saved}" in resumed.stdout, resumed.stderr[
        -3000:
    ]
    assert_same_weights(tmp_path / "a" / "iter_40.pth", work_dir / "iter_40.pth")


@pytest.mark.slow
def test_sigusr1_to_run_8p_stops_every_rank_and_relaunching_resumes_bit_exact(
    synthetic_root, tmp_path
):
    """SLURM's --signal=USR1@N to the launch script: no traceback, exit 138, no process left, and
    relaunching the same command (what --requeue does) ends where an uninterrupted 2-rank run
    does."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DATA_ROOT": str(synthetic_root),
        "NPROC": "2",
        "DIST_BACKEND": "gloo",
    }
    args = ["perf", *QUICK, "--iters", "40", "--ckpt-interval", "1000", "--log-interval", "1"]

    def launch(work_dir, **kw):
        run_env = {**env, "WORK_DIR": str(work_dir), "MASTER_PORT": str(free_port())}
        return subprocess.Popen(
            ["bash", "run_8p.sh", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=run_env,
            **kw,
        )

    straight = launch(tmp_path / "a")
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]
    work_dir = tmp_path / "b"
    run = launch(work_dir, start_new_session=True)
    try:
        stopped = stop_with(run, signal.SIGUSR1, work_dir, after=5)
        reached, seconds = stopped.reached, stopped.seconds
        stdout, stderr = stopped.stdout, stopped.stderr
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 138 and "Traceback" not in stderr, stderr[-3000:]
    saved = torch.load(work_dir / "latest.pth", weights_only=True)["iteration"]
    assert (
        f"error: stopped by SIGTERM after iteration {saved}; saved" in stderr
        and reached <= saved <= reached + 2
        and seconds < 60
    )
    assert (
        rank_pid(str(work_dir), 0) is None and rank_pid(str(work_dir), 1) is None
    )  # no rank outlives the launcher
    relaunched = launch(work_dir)
    stdout, stderr = relaunched.communicate(timeout=300)
    assert relaunched.returncode == 0 and f"at iteration {saved}" in stdout, stderr[-3000:]
    assert_same_weights(tmp_path / "a" / "iter_40.pth", work_dir / "iter_40.pth")


@pytest.mark.slow
def test_a_data_error_under_run_8p_stops_the_group_once_instead_of_restarting_it(
    synthetic_root, tmp_path
):
    """A label that cannot be read fails the same way on every restart: one line, exit 2, no
    restart, no rank left."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    broken = sorted((root / "gtFine" / "train").rglob("*_labelTrainIds.png"))[4]
    broken.write_bytes(broken.read_bytes()[:200])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DATA_ROOT": str(root),
        "NPROC": "2",
        "DIST_BACKEND": "gloo",
        "WORK_DIR": str(tmp_path / "wd"),
    }
    started = time.perf_counter()
    result = subprocess.run(
        ["bash", "run_8p.sh", "perf", *QUICK, "--iters", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "MASTER_PORT": str(free_port())},
    )
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert (
        result.returncode == 2
        and "Traceback" not in result.stderr
        and "restart" not in result.stderr.lower()
    ), result.stderr[-3000:]
    assert errors == [f"error: {broken}: unreadable label PNG; re-create or re-convert it"], errors
    assert (
        time.perf_counter() - started < 90
        and rank_pid(str(tmp_path / "wd"), 0) is None
        and rank_pid(str(tmp_path / "wd"), 1) is None
    )


@pytest.mark.slow
def test_a_killed_loader_worker_is_one_line(synthetic_root, tmp_path):
    work_dir = tmp_path / "wd"
    args = [
        "--data-root",
        str(synthetic_root),
        *QUICK,
        "--workers",
        "1",
        "--iters",
        "400",
        "--ckpt-interval",
        "1000",
        "--work-dir",
        str(work_dir),
    ]
    run = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run, work_dir, 3)
    children = []  # the loader worker: the training process's child
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().rsplit(")", 1)[1].split()[
                1
            ] == str(run.pid):
                children.append(int(proc.name))
        except OSError:
            continue
    assert children, "no loader worker found"
    os.kill(children[0], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=120)
    last = one_line_error(
        subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), code=1
    )
    assert "DataLoader worker" in last and last.endswith(
        "lower --workers, then run the same command again (training: with --resume)"
    )


@pytest.mark.slow
def test_sigterm_to_every_process_of_the_run_still_saves(synthetic_root, tmp_path):
    """SLURM signals every process of a step, loader workers included: they leave the signal to
    train.py, which saves (a worker killed by it would end the run with a DataLoader error and no
    checkpoint)."""
    work_dir = tmp_path / "wd"
    args = [
        *QUICK,
        "--workers",
        "1",
        "--iters",
        "400",
        "--ckpt-interval",
        "1000",
        "--val-interval",
        "2",
    ]
    args = [
        "--data-root",
        str(synthetic_root),
        *[a for a in args if a != "--no-validate"],
        "--work-dir",
        str(work_dir),
    ]
    run = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_step(run, work_dir, 3)
        os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    last = one_line_error(
        subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), code=143
    )
    saved = torch.load(work_dir / "latest.pth", weights_only=True)["iteration"]
    assert last.startswith(f"error: stopped by SIGTERM after iteration {saved}; saved")


def readme_slurm_script():
    """The README's SLURM job script, as written."""
    text = (ROOT / "docs" / "training.md").read_text()
    return next(
        block for block in text.split("```bash\n")[1:] if block.startswith("#!/bin/bash\n#SBATCH")
    ).split("```")[0]


@pytest.mark.slow
def test_the_readme_slurm_script_saves_at_the_signal_and_requeues_itself(synthetic_root, tmp_path):
    """The README's job script under stand-ins for sbatch, srun and scontrol (tests/slurm_stand_in:
    one machine, the signal to every process of the step as SLURM sends it): --signal=USR1@120 stops
    each run with its iteration saved, the script requeues the job, and the next run resumes from
    that iteration. Only the scale is changed: 2 CPU processes, a tiny run, a free port, and a
    time limit 120 s after each run's first logged step (so USR1 comes at that step)."""
    script = readme_slurm_script()
    scaled = {
        "NPROC=8": "NPROC=2",
        "/shared/work_dirs/r50_32p": str(tmp_path / "wd"),
        "MASTER_PORT=29500": f"MASTER_PORT={free_port()}",
    }
    scaled["run_8p.sh full"] = (
        f"run_8p.sh perf {' '.join(QUICK)} --iters 100000 --ckpt-interval 100000 --log-interval 1"
    )
    for written, used in scaled.items():
        assert written in script
        script = script.replace(written, used)
    (tmp_path / "job.sh").write_text(script)
    stand_in = ROOT / "tests" / "slurm_stand_in"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DATA_ROOT": str(synthetic_root),
        "DIST_BACKEND": "gloo",
        "STAND_IN_DIR": str(tmp_path / "slurm"),
    }
    env |= {
        "STAND_IN_TIME_LIMIT": "120",
        "STAND_IN_CLOCK_FILE": str(tmp_path / "wd" / "log.jsonl"),
        "STAND_IN_CLOCK_TEXT": '"loss"',
        "STAND_IN_MAX_RUNS": "2",
        "PATH": f"{stand_in}:{os.environ['PATH']}",
    }
    job = subprocess.run(
        ["sbatch", str(tmp_path / "job.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    runs = [json.loads(line) for line in job.stdout.splitlines() if line.startswith('{"run"')]
    assert [(r["exit_code"], r["signalled"], r["requeued"]) for r in runs] == [
        (138, True, True),
        (138, True, True),
    ], job.stderr[-3000:]
    stops = [
        int(line.split("after iteration ")[1].split(";")[0])
        for line in job.stderr.splitlines()
        if "error: stopped by" in line
    ]
    assert (
        len(stops) == 2 and 0 < stops[0] < stops[1] and f"at iteration {stops[0]}" in job.stdout
    ), job.stderr[-3000:]
    assert (
        torch.load(tmp_path / "wd" / "latest.pth", weights_only=True)["iteration"] == stops[1]
        and "Traceback" not in job.stderr
    )
    assert rank_pid(str(tmp_path / "wd"), 0) is None and rank_pid(str(tmp_path / "wd"), 1) is None
