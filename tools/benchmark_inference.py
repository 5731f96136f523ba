"""Inference speed on whatever device this is: one model against eager fp32, or the whole suite.

    python tools/benchmark_inference.py --depth 18 --size 1024x2048  # random R18
    python tools/benchmark_inference.py --ckpt model.pth             # a checkpoint's path
    python tools/benchmark_inference.py --model r18_int8.xml --ckpt CKPT  # vs CKPT, fp32
    python tools/benchmark_inference.py --model a.xml b.onnx c.param --size 512x1024
    python tools/benchmark_inference.py --suite     # bash run_1p.sh bench-infer
    BENCH_SMALL=1 python tools/benchmark_inference.py --suite  # at small sizes (CPUs, tests)

--suite: R18/R50 at 1024x2048 and 512x1024, batch 1 and the best batch; R18 through each inference
variant; a trained synthetic R18: fast path vs eager fp32 and a timed val pass. Several --model
files are timed one after the other in the same run, each against eager fp32, with the same threads.

Protocol: uint8 input on the device, class map at input size, synchronised, median of the timed runs
after warm-up, interleaved with eager fp32. The last line printed is JSON.
"""

import copy
import dataclasses
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from benchmark import environment, run_json, synthetic_data
from bisenet import RESNET_LAYOUTS, BiSeNetV1, ModelConfig
from checkpoints import load_model
from cityscapes import NUM_CLASSES
from device import CpuFeatures, cpu_amp_dtype, setup_runtime
from evaluate import inference_model, torch_segmenter

# Sizes timed, batches tried for throughput, the val split that is timed and the training that
# precedes it.
INFER_SIZES = {"full": [(1024, 2048), (512, 1024)], "small": [(128, 256), (64, 128)]}
INFER_BATCHES = {"full": (2, 4, 8, 16), "small": (2,)}
INFER_DATA = {
    "full": dict(train=16, val=100, height=1024, width=2048),
    "small": dict(train=8, val=4, height=128, width=256),
}
INFER_TRAIN = {
    "full": ["--batch-size", "8", "--crop", "512x1024", "--iters", "80"],
    "small": ["--batch-size", "2", "--crop", "64x128", "--iters", "6"],
}

# Inference variants of R18 at the first size, batch 1: what each changes from the default path
# (evaluate.py's).
INFER_VARIANTS = {
    "default": {},
    "bf16": {"amp_dtype": torch.bfloat16},
    "fp16": {"amp_dtype": torch.float16},
    "compile": {"compile_mode": "default"},
    "compile-cuda-graphs": {"compile_mode": "reduce-overhead"},
    "compile-max-autotune": {"compile_mode": "max-autotune"},
}


# -- One path against eager fp32 ------------------------------------------------------------------
def baseline_model(deployed, ckpt):
    """The eager fp32 baseline of an exported model: --ckpt, else the checkpoint it was exported
    from when it is at hand, else the same architecture with random weights (the same speed)."""
    config, source = (
        ModelConfig.from_dict(deployed.metadata["model_config"], "the exported model"),
        ckpt or deployed.metadata["source"],
    )
    if source and Path(source).is_file():
        model = load_model(source)[0]
        if (model.config.depth, model.config.num_classes) != (config.depth, config.num_classes):
            raise cli.UsageError(
                f"--ckpt {source}: R{model.config.depth}, {model.config.num_classes} classes; "
                f"the exported model is R{config.depth}, {config.num_classes} classes"
            )
        return model, f"eager fp32 of {source}"
    return (
        BiSeNetV1(config).eval(),
        "eager fp32 of the same architecture "
        "(random weights: the source checkpoint is not at hand)",
    )


def time_runs(segment, images, *, runtime, runs):
    times = []
    for _ in range(runs):
        runtime.synchronize()
        start = time.perf_counter()
        segment(images)
        runtime.synchronize()
        times.append(time.perf_counter() - start)
    return times


def eager_fp32(model, runtime):
    """The baseline every speed-up is measured against: eager fp32, BatchNorm unfused, contiguous
    tensors, the full-size logits, then the class map."""
    plain = copy.deepcopy(model).eval().to(runtime.device)

    def segment(images):
        with torch.no_grad():
            return plain(images).max(1).indices

    return segment


def compare_with_eager(segment, model, *, runtime, size, runs, warmup, batch, path):
    """segment (uint8 images on the device -> class map at input size, synchronised) timed
    interleaved with eager_fp32(model), so that machine drift hits both alike; FPS = images per
    second."""
    images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=runtime.device)
    baseline = eager_fp32(model, runtime)
    warmup_s = sum(time_runs(segment, images, runtime=runtime, runs=warmup))
    fast_times, plain_times = [], []
    for _ in range(runs):
        fast_times += time_runs(segment, images, runtime=runtime, runs=1)
        plain_times += time_runs(baseline, images, runtime=runtime, runs=1)
    fast_ms, plain_ms = 1000 * statistics.median(fast_times), 1000 * statistics.median(plain_times)
    result = {
        "latency_ms_median": round(fast_ms, 2),
        "latency_ms_min": round(1000 * min(fast_times), 2),
        "latency_ms_max": round(1000 * max(fast_times), 2),
        "fps": round(1000 * batch / fast_ms, 2),
        "device": runtime.name,
        "size": f"{size[0]}x{size[1]}",
        "batch": batch,
        "warmup_runs": warmup,
        "warmup_s": round(warmup_s, 2),
        "timed_runs": runs,
        "baseline_ms_median": round(plain_ms, 2),
        "speedup": round(plain_ms / fast_ms, 2),
    }
    print(
        f"inference on {result['device']}: {batch}x3x{size[0]}x{size[1]}, {path}, "
        f"{warmup} warm-up + {runs} timed runs"
    )
    print(
        f"  latency median {fast_ms:.1f} ms (min {result['latency_ms_min']}, "
        f"max {result['latency_ms_max']}), {result['fps']} FPS"
    )
    print(
        f"  baseline eager fp32 (BN unfused, contiguous): median {plain_ms:.1f} ms "
        f"-> speedup {plain_ms / fast_ms:.2f}x"
    )
    if fast_ms > plain_ms:
        print(
            f"warning: this path ({path}) is slower than eager fp32 here; "
            "the faster variant is --amp O0 (fp32)"
        )
    return result


def benchmark(model, runtime, *, size, amp, runs, warmup, batch=1, compile_mode=None):
    """evaluate.py's PyTorch path against eager fp32. compile_mode: torch.compile the inference path
    in that mode ("default", "reduce-overhead" = CUDA graphs, ...); compiling happens in the warm-up
    runs, whose time is reported."""
    fast = inference_model(model, runtime)
    fast = torch.compile(fast, mode=compile_mode) if compile_mode else fast
    precision = runtime.precision(amp)
    path = f"{precision}, BN folded, {str(runtime.memory_format).removeprefix('torch.')}"
    warmup = max(warmup, 1 if compile_mode else 0)
    result = compare_with_eager(
        torch_segmenter(fast, runtime, amp=amp),
        model,
        runtime=runtime,
        size=size,
        runs=runs,
        warmup=warmup,
        batch=batch,
        path=path,
    )
    return {**result, "precision": precision, "compile_mode": compile_mode}


def benchmark_deployed(deployed, path, *, model, source, runtime, size, runs, warmup, batch=1):
    """An exported model against eager fp32 of `model` (its source checkpoint, or the same
    architecture)."""
    result = compare_with_eager(
        deployed,
        model,
        runtime=runtime,
        size=size,
        runs=runs,
        warmup=warmup,
        batch=batch,
        path=f"{deployed.precision} ({path})",
    )
    return {**result, "precision": deployed.precision, "model": str(path), "baseline": source}


def inference_variants(runtime, size, *, variants, runs, warmup, log):
    """R18 batch 1 through each variant of the inference path, against eager fp32 (warm-up time
    includes compiling)."""
    model = BiSeNetV1(ModelConfig(18, NUM_CLASSES)).eval()
    out = {}
    for name in variants:
        options = dict(INFER_VARIANTS[name])
        dtype = options.pop("amp_dtype", None)
        variant_runtime = (
            dataclasses.replace(runtime, amp_dtype=dtype, amp_reason="") if dtype else runtime
        )
        try:
            result = benchmark(
                model,
                variant_runtime,
                size=size,
                amp="O1",
                runs=runs,
                warmup=warmup,
                compile_mode=options.get("compile_mode"),
            )
        except (
            Exception
        ) as e:  # one variant failing (a compiler error) must not cost the other measurements
            out[name] = {"error": cli.first_line(e)}
            continue
        out[name] = {
            key: result[key]
            for key in ("fps", "latency_ms_median", "speedup", "precision", "warmup_s")
        }
        log(f"R18 {size[0]}x{size[1]} {name}: {out[name]}")
    return out


def default_infer_variants(runtime):
    """Everything on a GPU; on a CPU, compiling takes minutes per variant, so only the precisions:
    bf16 where the CPU computes it natively (device.cpu_amp_dtype), none on other CPUs, where bf16
    is many times slower than fp32."""
    if runtime.device.type == "cuda":
        return list(INFER_VARIANTS)
    return (
        ["default", "bf16"]
        if cpu_amp_dtype(CpuFeatures.detect())[0] == torch.bfloat16
        else ["default"]
    )


def inference_speeds(runtime, sizes, *, batches, runs, warmup, log):
    """R18 and R50 at each size: batch 1, and the batch with the most images per second."""
    out = {}
    for depth in (18, 50):
        model = BiSeNetV1(ModelConfig(depth, NUM_CLASSES)).eval()
        for size in sizes:
            single = benchmark(model, runtime, size=size, amp="O1", runs=runs, warmup=warmup)
            best = single
            for batch in batches:
                result = benchmark(
                    model, runtime, size=size, amp="O1", runs=runs, warmup=warmup, batch=batch
                )
                best = result if result["fps"] > best["fps"] else best
            out[f"r{depth}_{size[0]}x{size[1]}"] = {
                "fps": single["fps"],
                "latency_ms": single["latency_ms_median"],
                "speedup_vs_eager_fp32": single["speedup"],
                "precision": single["precision"],
                "best_batch": best["batch"],
                "best_batch_fps": best["fps"],
            }
            log(f"R{depth} {size[0]}x{size[1]}: {out[f'r{depth}_{size[0]}x{size[1]}']}")
    return out


def class_maps(folder):
    return np.stack([np.array(Image.open(p)) for p in sorted(Path(folder).rglob("*.png"))])


def validation_pass(data_root, work_dir, *, device, train_recipe, workers, log):
    """A trained synthetic R18: evaluate.py's default (fast) path against eager fp32 (class maps,
    mIoU), and the wall time of a whole val pass, split into data loading and model time."""
    train_cmd = [sys.executable, "train.py", "--data-root", data_root]
    train_cmd += ["--work-dir", work_dir / "r18"]
    train_cmd += ["--device", device, "--depth", "18", *train_recipe, "--workers", str(workers)]
    train_cmd += "--lr 0.05 --warmup-iters 5 --no-validate --log-interval 10".split()
    trained, output = run_json(train_cmd, timeout=600)
    if trained is None:
        return {"error": output}
    evaluate_cmd = [sys.executable, "evaluate.py", "--ckpt", trained["checkpoint"]]
    evaluate_cmd += ["--data-root", data_root, "--device", device, "--workers", str(workers)]
    start = time.perf_counter()
    timed, output = run_json(evaluate_cmd, timeout=600)
    wall = time.perf_counter() - start
    if timed is None:
        return {"error": output}
    results = {}
    for amp in ("O0", "O1"):
        predict = ["--amp", amp, "--out-dir", work_dir / f"pred_{amp}", "--format", "trainIds"]
        results[amp], output = run_json([*evaluate_cmd, *predict], timeout=600)
        if results[amp] is None:
            return {"error": output}
    agreement = float((class_maps(work_dir / "pred_O0") == class_maps(work_dir / "pred_O1")).mean())
    result = {
        "train_iters": trained["iters"],
        "images": timed["images"],
        "mode": timed["mode"],
        "precision": timed["precision"],
        "mIoU": timed["mIoU"],
        "mIoU_fp32": results["O0"]["mIoU"],
        "class_map_agreement": round(agreement, 6),
        "process_wall_s": round(wall, 2),
        "eval_s": timed["eval_s"],
        "data_s": timed["data_s"],
        "model_s": timed["model_s"],
        "images_per_s": round(timed["images"] / timed["eval_s"], 2),
        "workers": workers,
    }
    log(f"val pass, {result['images']} images: {result}")
    return result


def run_suite(args):
    """Inference speeds, variants, fast-path agreement and a timed val pass; one JSON line."""
    started = time.perf_counter()
    size = "small" if args.small else "full"
    runtime = setup_runtime(args.device)
    log = functools.partial(print, flush=True)
    result = {
        **environment(runtime),
        "size": size,
        "protocol": f"median of {args.runs} timed runs after {args.warmup} warm-up, "
        "synchronised, interleaved with eager fp32",
    }
    log(
        f"inference benchmark on {result['device']} (torch {result['torch']}, "
        f"CUDA {result['cuda']}, cuDNN {result['cudnn']}), {size} sizes"
    )
    log(runtime.device_note)
    log(runtime.precision_note("O1"))
    result["speed"] = inference_speeds(
        runtime,
        INFER_SIZES[size],
        batches=INFER_BATCHES[size],
        runs=args.runs,
        warmup=args.warmup,
        log=log,
    )
    variants = (
        args.infer_variants.split(",") if args.infer_variants else default_infer_variants(runtime)
    )
    result["variants"] = inference_variants(
        runtime,
        INFER_SIZES[size][0],
        variants=variants,
        runs=args.runs,
        warmup=args.warmup,
        log=log,
    )
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    work = (
        Path(args.work_dir)
        if args.work_dir
        else Path(tempfile.mkdtemp(prefix="bisenet_bench_infer_"))
    )
    try:
        data_root = synthetic_data(work / "data", INFER_DATA[size], seed=2, log=log)
        result["val"] = validation_pass(
            data_root,
            work,
            device=runtime.device.type,
            train_recipe=INFER_TRAIN[size],
            workers=workers,
            log=log,
        )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    return result


def benchmark_models(paths, *, ckpt, amp, runtime, **timing):
    """Each exported model against eager fp32 (interleaved, so that drift hits both alike): one
    model's result, or for several a table and {"models": [...], "fastest": path}."""
    from deploy import open_deployed, openvino_precision, threads

    results = []
    for path in paths:
        deployed = open_deployed(path, openvino_precision(runtime, amp))
        model, source = baseline_model(deployed, ckpt)
        result = benchmark_deployed(
            deployed, path, model=model, source=source, runtime=runtime, **timing
        )
        results.append({**result, "threads": threads()})
    if len(results) == 1:
        return results[0]
    print(f"{'runtime':<36} {'median ms':>10} {'eager fp32 ms':>14} {'speedup':>8}")
    for r in results:
        name = f"{r['precision']} ({Path(r['model']).suffix})"
        print(
            f"{name:<36} {r['latency_ms_median']:>10} {r['baseline_ms_median']:>14} "
            f"{r['speedup']:>7}x"
        )
    fastest = min(results, key=lambda r: r["latency_ms_median"])
    print(f"fastest here: {fastest['precision']} ({fastest['model']})")
    return {"models": results, "fastest": fastest["model"], "threads": threads()}


def run_one(args):
    """A checkpoint's (or a random model's) default path, or exported models, against eager
    fp32."""
    runtime = setup_runtime(
        "cpu" if args.model else args.device, args.device_id, amp_dtype=args.amp_dtype
    )
    print(runtime.device_note, flush=True)
    print(runtime.precision_note(args.amp), flush=True)
    timing = dict(
        runtime=runtime, size=args.size, runs=args.runs, warmup=args.warmup, batch=args.batch
    )
    if args.model:
        result = benchmark_models(args.model, ckpt=args.ckpt, amp=args.amp, **timing)
    else:
        model = (
            load_model(args.ckpt)[0]
            if args.ckpt
            else BiSeNetV1(ModelConfig(args.depth, args.num_classes)).eval()
        )
        result = benchmark(model, amp=args.amp, **timing)
    print(json.dumps(result))


def add_suite_flags(p):
    suite = p.add_argument_group("the suite")
    suite.add_argument(
        "--suite",
        action="store_true",
        help="every measurement above the flags (bash run_1p.sh bench-infer)",
    )
    suite.add_argument(
        "--small",
        action="store_true",
        default=os.environ.get("BENCH_SMALL") == "1",
        help="small sizes (also BENCH_SMALL=1)",
    )
    suite.add_argument(
        "--workers",
        type=cli.integer(0),
        default=None,
        help="loader workers of train.py and evaluate.py (default: CPUs - 2)",
    )
    suite.add_argument(
        "--infer-variants",
        help=f"comma-separated: {', '.join(INFER_VARIANTS)} (default: all on CUDA, "
        "default,bf16 on a CPU with native bf16, else default)",
    )
    suite.add_argument(
        "--work-dir",
        help="where the synthetic data and runs go (default: a temporary folder, removed)",
    )


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_device_flags(p)
    p.add_argument(
        "--warmup",
        type=cli.integer(0),
        default=3,
        help="untimed runs per measurement (compiling happens here)",
    )
    p.add_argument("--runs", type=cli.integer(1), default=10, help="timed runs per measurement")
    one = p.add_argument_group("one model")
    one.add_argument(
        "--ckpt",
        help="a checkpoint (default: random weights of --depth); "
        "with --model: the eager fp32 baseline",
    )
    one.add_argument(
        "--model",
        nargs="+",
        help="OpenVINO .xml, ONNX .onnx or ncnn .param files of tools/export.py (run on the CPU), "
        "each timed against eager fp32",
    )
    one.add_argument(
        "--depth",
        type=int,
        default=18,
        choices=sorted(RESNET_LAYOUTS),
        help="without --ckpt: random weights of this depth",
    )
    one.add_argument(
        "--num-classes",
        type=cli.integer(2, 255),
        default=NUM_CLASSES,
        help="without --ckpt: classes of the random model",
    )
    one.add_argument("--size", type=cli.size, default="1024x2048", help="input HxW")
    one.add_argument("--batch", type=cli.integer(1), default=1, help="images per run")
    add_suite_flags(p)
    args = p.parse_args(argv)
    unknown = [v for v in (args.infer_variants or "").split(",") if v and v not in INFER_VARIANTS]
    if unknown:
        p.error(
            f"argument --infer-variants: unknown {unknown}; choose from {', '.join(INFER_VARIANTS)}"
        )
    if args.model and args.device not in ("auto", "cpu"):
        p.error(
            "argument --model: an exported model runs on the CPU "
            f"(OpenVINO, ONNX Runtime or ncnn); drop --device {args.device}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.main(run_suite if args.suite else run_one, args)


if __name__ == "__main__":
    main()
