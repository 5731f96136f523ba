"""Training speed of the published recipes on whatever device this is, in one command (`bash
run_1p.sh bench`).

    python tools/benchmark.py                 # steps of R50 8 x 1024x1024 and R18 16 x 1024x1024,
                                              # O1 vs eager fp32, end-to-end train.py on synthetic
                                              # 2048x1024 Cityscapes, torchrun check
    python tools/benchmark.py --variants all  # also every speed option against the default
    BENCH_SMALL=1 python tools/benchmark.py   # the same at small sizes, for CPUs and the tests

Step protocol: random uint8 images and labels already on the device; one step = forward, the three
heads' CE loss in fp32, backward, SGD (momentum, weight decay) through the loss scaler,
synchronised; untimed warm-up steps (cuDNN autotuning, compilation), then the median of the timed
steps. Variants run interleaved, one step each in turn, so drift hits all alike. Peak memory: the
most PyTorch allocates for one step, weights, gradients and momentum included (what one training
process of that recipe needs). The last line printed is JSON.
"""

import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from bisenet import RESNET_LAYOUTS
from cityscapes import NUM_CLASSES, open_dataset
from datasets import TrainTransform
from device import AMP_DTYPES, DEFAULT_BACKEND, setup_runtime, sgd
from synthetic import trainable_cityscapes
from train import create_model, data_parallel, segmentation_loss, train_step
from train import parse_args as train_flags

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one device trains in a step: the model depth, images per device and their crop."""

    name: str
    depth: int
    batch: int
    crop: tuple


def timed_recipe(name, recipe, *, small):
    """A train.py recipe on one device; small: 2 images of 64x128."""
    settings = train_flags(["--recipe", recipe])
    if small:
        return Recipe(name, settings.depth, 2, (64, 128))
    return Recipe(name, settings.depth, settings.batch_size, settings.crop)


# Ascend ModelZoo's recipe and mmseg's R18 recipe, and their small stand-ins
RECIPES = {
    size: [
        timed_recipe("r50", "ascend_r50", small=size == "small"),
        timed_recipe("r18", "mmseg_r18", small=size == "small"),
    ]
    for size in ("full", "small")
}
DATA = {
    "full": dict(train=32, val=4, height=1024, width=2048),
    "small": dict(train=8, val=2, height=128, width=256),
}
TORCHRUN_RECIPE = {
    "full": ["--batch-size", "4", "--crop", "512x1024"],
    "small": ["--batch-size", "2", "--crop", "64x128"],
}

# What each variant changes from this device's default training path (train.py's defaults).
VARIANTS = {
    "default": {},
    "fp32": {"amp": "O0", "channels_last": False},  # eager fp32, contiguous: the baseline
    "fp16": {"amp_dtype": "float16"},
    "bf16": {"amp_dtype": "bfloat16"},
    "contiguous": {"channels_last": False},
    "channels-last": {"channels_last": True},
    "fused-sgd": {"sgd_kernel": "fused"},
    "foreach-sgd": {"sgd_kernel": "default"},
    "ddp": {"ddp": True},
    "compile": {"compile": True},
}
DEFAULT_VARIANTS = ["default", "fp32"]


@dataclasses.dataclass
class Setup:
    """One variant, ready to step: its model, optimizer and scaler live on the device for the whole
    comparison."""

    step: callable
    state_bytes: callable


def variant_options(runtime, changes):
    options = dict(
        amp="O1",
        amp_dtype="auto",
        channels_last=runtime.prefers_channels_last,
        sgd_kernel=runtime.sgd_kernel,
        ddp=False,
        compile=False,
    )
    return {**options, **changes}


def build_setup(runtime, depth, *, images, labels, options):
    dtype = AMP_DTYPES.get(options["amp_dtype"])
    runtime = dataclasses.replace(runtime, amp_dtype=dtype, amp_reason="") if dtype else runtime
    torch.manual_seed(0)
    model = create_model(
        runtime,
        depth=depth,
        num_classes=NUM_CLASSES,
        dropout=0.1,
        channels_last=options["channels_last"],
        log=lambda _: None,
    ).train()
    optimizer = sgd(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, kernel=options["sgd_kernel"]
    )
    stepped = data_parallel(model, runtime) if options["ddp"] else model
    stepped = torch.compile(stepped) if options["compile"] else stepped
    scaler = runtime.grad_scaler(options["amp"])
    autocast = functools.partial(runtime.autocast, options["amp"])
    x = images.contiguous(memory_format=torch.channels_last) if options["channels_last"] else images

    def step():
        return train_step(
            stepped,
            optimizer,
            scaler=scaler,
            images=x,
            labels=labels,
            loss_fn=segmentation_loss,
            autocast=autocast,
        ).item()

    def state_bytes():
        tensors = [
            *model.parameters(),
            *model.buffers(),
            *(p.grad for p in model.parameters() if p.grad is not None),
        ]
        tensors += [
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    return Setup(step, state_bytes)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_single_process_group(runtime):
    """DDP needs a process group; outside torchrun this process forms a group of one."""
    if not dist.is_initialized():
        dist.init_process_group(
            DEFAULT_BACKEND[runtime.device.type],
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )


def time_variants(setups, runtime, *, warmup, steps):
    """{name: {step_ms, first_step_s, peak_gb} or {error}}; every variant takes one step per
    round."""
    cuda = runtime.device.type == "cuda"
    times, first, peak = {n: [] for n in setups}, {}, {}
    errors = {}
    for i in range(warmup + steps):
        for name, setup in setups.items():
            if name in errors:
                continue
            runtime.synchronize()
            if cuda:
                torch.cuda.reset_peak_memory_stats(runtime.device)
                before = torch.cuda.memory_allocated(runtime.device)
            start = time.perf_counter()
            try:
                setup.step()
                runtime.synchronize()
            # one failing variant (out of memory, a compiler error) must not lose the others
            except Exception as e:
                errors[name] = cli.first_line(e)
                continue
            elapsed = time.perf_counter() - start
            first.setdefault(name, elapsed)
            if i >= warmup:
                times[name].append(elapsed)
            if cuda:
                peak[name] = max(
                    peak.get(name, 0),
                    torch.cuda.max_memory_allocated(runtime.device) - before + setup.state_bytes(),
                )
    results = {}
    for name in setups:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        ms = 1000 * statistics.median(times[name])
        results[name] = {
            "step_ms": round(ms, 2),
            "first_step_s": round(first[name], 2),
            "peak_gb": round(peak[name] / 1e9, 2) if name in peak else None,
        }
    return results


def random_batch(runtime, batch, *, crop):
    """uint8 images and labels already on the device, the same for every variant."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, device=runtime.device)
    return images, torch.randint(0, NUM_CLASSES, (batch, *crop), device=runtime.device)


def step_benchmarks(runtime, recipes, *, variants, warmup, steps, log):
    out = {}
    for recipe in recipes:
        name, batch, crop = recipe.name, recipe.batch, recipe.crop
        images, labels = random_batch(runtime, batch, crop=crop)
        setups, failed = {}, {}
        for variant in variants:
            try:
                setups[variant] = build_setup(
                    runtime,
                    recipe.depth,
                    images=images,
                    labels=labels,
                    options=variant_options(runtime, VARIANTS[variant]),
                )
            except Exception as e:
                failed[variant] = {"error": cli.first_line(e)}
        results = {**time_variants(setups, runtime, warmup=warmup, steps=steps), **failed}
        for result in results.values():
            if "step_ms" in result:
                result["img_s"] = round(batch / result["step_ms"] * 1000, 2)
        out[name] = {
            "depth": recipe.depth,
            "batch": batch,
            "crop": f"{crop[0]}x{crop[1]}",
            "variants": results,
        }
        del setups
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        log_recipe(name, out[name], log=log)
    return out


def profile_default_step(runtime, recipes, *, log, steps=3):
    """The kernels that bound the default step: top operators by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if runtime.device.type == "cuda" else []
    )
    sort_by = "device_time_total" if runtime.device.type == "cuda" else "cpu_time_total"
    for recipe in recipes:
        images, labels = random_batch(runtime, recipe.batch, crop=recipe.crop)
        setup = build_setup(
            runtime,
            recipe.depth,
            images=images,
            labels=labels,
            options=variant_options(runtime, {}),
        )
        setup.step()
        runtime.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                setup.step()
            runtime.synchronize()
        log(
            f"{recipe.name.upper()} default step, {steps} steps profiled, top operators by "
            f"{sort_by}:"
        )
        log(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
        del setup


def log_recipe(name, result, *, log):
    variants = result["variants"]
    base = variants.get("default", {}).get("step_ms")
    log(f"{name.upper()} training step, {result['batch']} x {result['crop']}, 3 CE heads, SGD:")
    for variant, r in variants.items():
        if "error" in r:
            log(f"  {variant:>20}: failed: {r['error']}")
            continue
        ratio = f"{base / r['step_ms']:.2f}x default" if base else ""
        memory = f", peak {r['peak_gb']} GB" if r["peak_gb"] is not None else ""
        log(
            f"  {variant:>20}: {r['step_ms']:8.1f} ms  {r['img_s']:8.2f} img/s  ({ratio}; first "
            f"step {r['first_step_s']} s{memory})"
        )
    warning = slower_than_fp32(variants)
    if warning:
        log(f"warning: {name.upper()}: {warning}")


def slower_than_fp32(variants):
    """A sentence when the measured default step is slower than eager fp32, naming the fastest
    variant; else None."""
    timed = {name: r["step_ms"] for name, r in variants.items() if "step_ms" in r}
    if "default" not in timed or "fp32" not in timed or timed["default"] <= timed["fp32"]:
        return None
    fastest = min(timed, key=timed.get)
    return (
        f"the default step ({timed['default']:.0f} ms) is slower than eager fp32 "
        f"({timed['fp32']:.0f} ms) on this device; fastest measured: {fastest} "
        f"({timed[fastest]:.0f} ms)"
    )


def synthetic_data(data_root, sizes, *, seed, log):
    """A synthetic Cityscapes with train lists, made on every CPU (so it costs little device time),
    kept if present."""
    if not (data_root / "val.txt").is_file():
        start = time.perf_counter()
        trainable_cityscapes(data_root, **sizes, seed=seed, nproc=max(1, os.cpu_count() or 1))
        log(
            f"synthetic Cityscapes, {sizes['train']} train + {sizes['val']} val images of "
            f"{sizes['width']}x{sizes['height']}: {time.perf_counter() - start:.1f} s"
        )
    return data_root


def run_json(cmd, timeout=None):
    """Run a command of this project; (its last JSON line, its whole output). Failures come back as
    text, not raised. It runs in a process group of its own, killed whole on a timeout or Ctrl-C:
    killing torchrun alone would leave its train.py running."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return (
            None,
            f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{(stdout + stderr)[-1500:]}",
        )
    output = stdout + stderr
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{stderr[-1500:]}"
    try:
        return json.loads(stdout.strip().splitlines()[-1]), output
    except (json.JSONDecodeError, IndexError):
        return None, f"no JSON summary from {' '.join(map(str, cmd))}\n{output[-1500:]}"


def end_to_end(data_root, work_dir, *, device, depth, batch, crop, iters, workers):
    """train.py as a user runs it (data loading, augmentation, copies, logging), throughput after
    its warm-up."""
    cmd = [
        sys.executable,
        "train.py",
        "--data-root",
        data_root,
        "--work-dir",
        work_dir,
        "--device",
        device,
        "--depth",
        str(depth),
    ]
    cmd += [
        "--batch-size",
        str(batch),
        "--crop",
        f"{crop[0]}x{crop[1]}",
        "--iters",
        str(iters),
        "--no-validate",
        "--ckpt-interval",
        str(iters),
    ]
    cmd += ["--log-interval", "10", "--workers", str(workers), "--warmup-iters", "0"]
    summary, output = run_json(cmd, timeout=300)
    if summary is None:
        return {"error": output}
    return {
        "train_fps": summary["train_fps"],
        "data_wait_frac": summary["data_wait_frac"],
        "iters": iters,
        "workers": workers,
        "precision": summary["precision"],
    }


def torchrun_check(data_root, work_dir, *, device, recipe):
    """One process under torchrun with the device's default backend: train, resume, evaluate
    (distributed)."""
    launch = f"{sys.executable} -m torch.distributed.run --nproc-per-node 1".split()
    launch += ["--master-port", str(free_port())]
    where = ["--data-root", data_root, "--device", device, "--workers", "2"]
    train = [*launch, "train.py", *where, "--work-dir", work_dir, "--depth", "18", *recipe]
    train += "--no-validate --ckpt-interval 2 --warmup-iters 2 --log-interval 1".split()
    first, output = run_json([*train, "--iters", "4"], timeout=120)
    if first is None:
        return {"error": output}
    second, output = run_json([*train, "--iters", "6", "--resume"], timeout=120)
    if second is None:
        return {"error": output}
    resumed = "resumed from" in output and "at iteration 4" in output
    evaluation = [*launch, "evaluate.py", "--ckpt", second["checkpoint"], *where]
    val, output = run_json(evaluation, timeout=120)
    if val is None:
        return {"error": output}
    return {
        "backend": second["backend"],
        "world_size": second["world_size"],
        "resumed_at": 4 if resumed else None,
        "iters": second["iters"],
        "val_mIoU": val["mIoU"],
    }


def environment(runtime):
    info = {
        "device": runtime.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "cpus": os.cpu_count(),
    }
    if runtime.device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["device_memory_gb"] = round(
            torch.cuda.get_device_properties(runtime.device).total_memory / 1e9, 1
        )
    return info


def transform_speed(samples, crop, *, log):
    """`python tools/benchmark.py --transform`: the training transform on 2048x1024 PNG pairs, one
    process, decode included."""
    with tempfile.TemporaryDirectory() as tmp:
        trainable_cityscapes(tmp, train=4, val=0, height=1024, width=2048)
        dataset = open_dataset(
            tmp, "train", dataset_type="cityscapes", transform=TrainTransform(crop=crop)
        )
        dataset[(0, 0)]
        start = time.perf_counter()
        for i in range(samples):
            dataset[(i % len(dataset), i)]
        rate = samples / (time.perf_counter() - start)
    log(
        f"training transform, 2048x1024 PNG pair -> {crop[0]}x{crop[1]} crop, one process: "
        f"{rate:.1f} samples/s"
    )
    print(json.dumps({"transform_samples_per_s": round(rate, 2)}), flush=True)


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--device", default="auto", choices=cli.DEVICES)
    small = os.environ.get("BENCH_SMALL") == "1"
    p.add_argument(
        "--small", action="store_true", default=small, help="small sizes (BENCH_SMALL=1)"
    )
    one = "time this one recipe instead of the two published ones (with --batch-size, --crop)"
    p.add_argument("--depth", type=int, choices=sorted(RESNET_LAYOUTS), help=one)
    batch = "with --depth: images per device (BatchNorm on the pooled attention maps needs 2)"
    p.add_argument("--batch-size", type=cli.integer(2), default=8, help=batch)
    crop = "with --depth: HxW, both sides >= 32"
    p.add_argument("--crop", type=cli.size, default="1024x1024", help=crop)
    variants = f"comma-separated, or 'all': {', '.join(VARIANTS)}"
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=variants)
    p.add_argument("--warmup", type=cli.integer(1), default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=cli.integer(1), default=15, help="timed steps per variant")
    e2e = "train.py iterations per end-to-end run (default 60; small: 12)"
    p.add_argument("--e2e-iters", type=cli.integer(2), help=e2e)
    workers = "loader workers in the end-to-end runs (default: CPUs - 2)"
    p.add_argument("--workers", type=cli.integer(0), help=workers)
    profile = "also print the top operators of each recipe's default step"
    p.add_argument("--profile", action="store_true", help=profile)
    skip = "comma-separated parts to leave out: steps, e2e, torchrun"
    p.add_argument("--skip", default="", help=skip)
    work = "where the synthetic data and runs go (default: a temporary folder, removed)"
    p.add_argument("--work-dir", help=work)
    transform = (
        "only the training transform's samples/s on 2048x1024 pairs (--steps samples, --crop)"
    )
    p.add_argument("--transform", action="store_true", help=transform)
    return checked(p.parse_args(argv))


def checked(args):
    """The lists behind --variants, --skip and --depth, checked."""
    args.variants = (
        list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    )
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise cli.UsageError(
            f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)} or 'all'"
        )
    crop = args.crop
    if min(crop) < 32:
        raise cli.UsageError(f"--crop {crop[0]}x{crop[1]}: both sides must be >= 32")
    args.recipes = (
        [Recipe(f"r{args.depth}", args.depth, args.batch_size, crop)]
        if args.depth
        else RECIPES["small" if args.small else "full"]
    )
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"steps", "e2e", "torchrun"}:
        raise cli.UsageError(
            f"--skip: unknown {sorted(args.skip - {'steps', 'e2e', 'torchrun'})}; choose from "
            "steps, e2e, torchrun"
        )
    return args


def end_to_end_benchmarks(data_root, work, recipes, *, device, iters, workers, log):
    """end_to_end of each recipe, each in a work dir of its own under `work`."""
    out = {}
    for recipe in recipes:
        name, crop = recipe.name, recipe.crop
        r = out[name] = end_to_end(
            data_root,
            work / f"e2e_{name}",
            device=device,
            depth=recipe.depth,
            batch=recipe.batch,
            crop=crop,
            iters=iters,
            workers=workers,
        )
        log(
            f"end-to-end train.py {name.upper()} {recipe.batch} x {crop[0]}x{crop[1]}, "
            f"{workers} workers: {r}"
        )
    return out


def run_training_benchmark(args, recipes, *, variants, skip):
    started = time.perf_counter()
    size = "small" if args.small else "full"
    runtime = setup_runtime(args.device)
    device = runtime.device.type
    log = functools.partial(print, flush=True)
    result = {
        **environment(runtime),
        "size": size,
        "protocol": (
            f"median of {args.steps} timed steps after {args.warmup} warm-up, synchronised, "
            "interleaved"
        ),
    }
    log(
        f"benchmark on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}, "
        f"cuDNN {result['cudnn']}, {result['cpus']} CPUs), {size} sizes"
    )
    log(runtime.device_note)
    log(runtime.precision_note("O1"))
    if "ddp" in variants:
        join_single_process_group(runtime)
    if "steps" not in skip:
        result["steps"] = step_benchmarks(
            runtime, recipes, variants=variants, warmup=args.warmup, steps=args.steps, log=log
        )
    if args.profile:
        try:
            profile_default_step(runtime, recipes, log=log)
        except Exception as e:  # the profile is for reading; it must not cost the measurements
            log(f"profile failed: {cli.first_line(e)}")
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    iters = args.e2e_iters or (12 if args.small else 60)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bisenet_bench_"))
    try:
        if not {"e2e", "torchrun"} <= skip:
            data_root = synthetic_data(work / "data", DATA[size], seed=1, log=log)
        if "e2e" not in skip:
            result["e2e"] = end_to_end_benchmarks(
                data_root, work, recipes, device=device, iters=iters, workers=workers, log=log
            )
        if "torchrun" not in skip:
            result["torchrun"] = torchrun_check(
                data_root, work / "torchrun", device=device, recipe=TORCHRUN_RECIPE[size]
            )
            log(f"torchrun, 1 process: {result['torchrun']}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(json.dumps(result), flush=True)
    return result


def run_command(argv):
    args = parse_args(argv)
    if args.transform:
        transform_speed(args.steps, args.crop, log=functools.partial(print, flush=True))
    else:
        run_training_benchmark(args, args.recipes, variants=args.variants, skip=args.skip)


def main(argv=None):
    cli.main(run_command, argv)


if __name__ == "__main__":
    main()
