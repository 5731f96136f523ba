"""How fast R18 learns from scratch: val mIoU at fixed iterations over several seeds, on a learnable
synthetic Cityscapes, with the recipe of the mmseg side-by-side comparison (docs/training.md:
Learning from scratch).

    # seeds 0 and 1, mIoU at 100/200/300
    python tools/benchmark_learning.py
    # data both trainers learn in 300 iterations
    python tools/benchmark_learning.py --data fast --seeds 0,1,2
    # anything after -- goes to train.py
    python tools/benchmark_learning.py --seeds 0,1,2 -- --loss-normalise valid

Each run is `train.py --recipe learning` in its own process (mmseg 1.2.2's BiSeNetV1 R18 config at a
CPU's scale, in fp32, so every CPU computes the same curve's shape), validated every --val-interval
iterations; the last line printed is JSON with every curve, the mean at each point and its standard
error (sem).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from benchmark import run_json
from synthetic import trainable_cityscapes

RECIPE = ["--recipe", "learning"]
# standard: scenes with lighting, texture and thin classes, where early differences hide in slow
# progress; fast: plain colours without the thin classes, learnt well above 60 mIoU by 300
# iterations (docs/performance.md)
DATASETS = {
    "standard": dict(train=48, val=12, height=256, width=512, seed=3),
    "fast": dict(train=48, val=12, height=256, width=512, seed=3, plain=True),
}


def learning_curve(data_root, work_dir, *, seed, iters, val_interval, workers, extra):
    """{iteration: val mIoU} of one from-scratch run."""
    cmd = [
        sys.executable,
        "train.py",
        "--data-root",
        data_root,
        "--work-dir",
        work_dir,
        *RECIPE,
        "--iters",
        str(iters),
        "--seed",
        str(seed),
    ]
    cmd += [
        "--val-interval",
        str(val_interval),
        "--ckpt-interval",
        str(iters),
        "--workers",
        str(workers),
        "--log-interval",
        "50",
        *extra,
    ]
    summary, output = run_json(cmd)
    if summary is None:
        raise cli.UsageError(
            f"train.py failed: {output.strip().splitlines()[-1] if output.strip() else 'no output'}"
        )
    entries = [json.loads(line) for line in (Path(work_dir) / "log.jsonl").read_text().splitlines()]
    return {e["iter"]: round(e["val_mIoU"], 2) for e in entries if "val_mIoU" in e}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = cli.ArgumentParser(__doc__)
    p.add_argument(
        "--data", default="standard", choices=sorted(DATASETS), help="which synthetic Cityscapes"
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--iters", type=cli.integer(1), default=300)
    p.add_argument("--val-interval", type=cli.integer(1), default=100)
    p.add_argument("--workers", type=cli.integer(0), default=2)
    p.add_argument(
        "--work-dir", help="where the synthetic data and runs go (default: a temporary folder)"
    )
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"argument --seeds: {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
    return args, extra


def curve_summary(curves):
    """({iteration: mean mIoU over seeds}, {iteration: standard error of that mean}) at the
    iterations every curve has; the error needs two seeds or more. Early points vary from seed to
    seed by several mIoU (docs/performance.md), so a difference of two means says little without
    it."""
    points = sorted(set.intersection(*(set(c) for c in curves.values())))
    values = {it: [c[it] for c in curves.values()] for it in points}
    mean = {it: round(statistics.mean(v), 2) for it, v in values.items()}
    sem = {
        it: round(statistics.stdev(v) / len(v) ** 0.5, 2) for it, v in values.items() if len(v) > 1
    }
    return mean, sem


def run_learning_benchmark(args, extra):
    started = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bisenet_learning_"))
    data_root = work / f"data_{args.data}"
    if not (data_root / "val.txt").is_file():
        trainable_cityscapes(data_root, **DATASETS[args.data])
    curves = {}
    for seed in args.seeds:
        curves[seed] = learning_curve(
            data_root,
            work / f"seed{seed}_{time.time_ns()}",
            seed=seed,
            iters=args.iters,
            val_interval=args.val_interval,
            workers=args.workers,
            extra=extra,
        )
        print(
            f"seed {seed}: " + ", ".join(f"@{it} {miou:.2f}" for it, miou in curves[seed].items()),
            flush=True,
        )
    mean, sem = curve_summary(curves)
    print(
        "mean: "
        + ", ".join(
            f"@{it} {m:.2f}" + (f" ± {sem[it]:.2f}" if it in sem else "") for it, m in mean.items()
        ),
        flush=True,
    )
    wall_s = round(time.perf_counter() - started, 1)
    print(
        json.dumps(
            {
                "train_args": RECIPE + extra,
                "data": args.data,
                "curves": curves,
                "mean": mean,
                "sem": sem,
                "wall_s": wall_s,
            }
        )
    )


def main(argv=None):
    cli.main(lambda: run_learning_benchmark(*parse_args(argv)))


if __name__ == "__main__":
    main()
