import functools
import json
import math
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT, in_process, last_json, succeeded
from PIL import Image
from torch import nn

from benchmark import free_port
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import open_dataset
from datasets import IGNORE_INDEX, IterationSampler, TrainTransform
from device import Runtime
from train import (
    learning_rate,
    ohem_cross_entropy,
    parse_args,
    segmentation_loss,
    train_step,
)

SMALL = [
    "--depth",
    "18",
    "--batch-size",
    "2",
    "--crop",
    "64x128",
    "--workers",
    "0",
    "--log-interval",
    "1",
]


def run_train(args):
    return in_process("train.py", *args)


@pytest.mark.parametrize("warmup", ["linear", "exp"])
def test_learning_rate_follows_mmcv_poly_with_warmup(warmup):
    schedule = functools.partial(
        learning_rate,
        base_lr=0.2,
        iters=40000,
        min_lr=1e-4,
        power=0.9,
        warmup_iters=1000,
        warmup=warmup,
        warmup_ratio=0.1,
    )
    for it in (0, 1, 500, 999, 1000, 20000, 39999):
        poly = (0.2 - 1e-4) * (1 - it / 40000) ** 0.9 + 1e-4
        if it < 1000:
            factor = (0.1 + 0.9 * it / 1000) if warmup == "linear" else 0.1 ** (1 - it / 1000)
            poly *= factor
        assert math.isclose(schedule(it), poly, rel_tol=1e-12), it
    assert math.isclose(schedule(0), 0.1 * (0.2 - 1e-4) + 0.1 * 1e-4)


# lr printed by mmengine 0.10.7 for LinearLR(start_factor=0.1, begin=0, end=25) +
# PolyLR(eta_min=1e-4, power=0.9, begin=25, end=300) on SGD(lr=0.025), stepped once per iteration as
# its ParamSchedulerHook does (mmseg 1.x's R18 schedule)
MMENGINE_LRS = {
    0: 0.0025000000000000005,
    1: 0.0034375000000000005,
    12: 0.013749999999999998,
    24: 0.024999999999999998,
    25: 0.024999999999999998,
    26: 0.024918196733945172,
    49: 0.02302819403387269,
    99: 0.018856458334480037,
    199: 0.010151337147031696,
    298: 0.00025930295819462054,
    299: 0.0001,
}


def chained_mmengine_lrs(base_lr, iters, warmup_iters, *, ratio=0.1, min_lr=1e-4, power=0.9):
    """mmengine's schedulers in their chainable form (mmengine/optim/scheduler/param_scheduler.py,
    _get_value of LinearParamScheduler and PolyParamScheduler): each step rescales the lr the
    previous step left."""
    lrs, lr = [], base_lr * ratio
    for it in range(iters):
        if 0 < it < warmup_iters:
            total = warmup_iters - 1
            lr *= 1 + (1 - ratio) / (total * ratio + (it - 1) * (1 - ratio))
        elif it > warmup_iters:
            poly_step, total = it - warmup_iters, iters - warmup_iters - 1
            lr = (lr - min_lr) * (1 - 1 / (total - poly_step + 1)) ** power + min_lr
        lrs.append(lr)
    return lrs


def test_mmengine_schedule_is_linear_warmup_then_poly_over_the_rest():
    schedule = functools.partial(
        learning_rate, base_lr=0.025, iters=300, warmup_iters=25, schedule="mmengine"
    )
    for it, lr in MMENGINE_LRS.items():
        assert math.isclose(schedule(it), lr, rel_tol=1e-9), it
    chained = chained_mmengine_lrs(0.025, 300, 25)
    assert all(math.isclose(schedule(it), chained[it], rel_tol=1e-9) for it in range(300))
    long = functools.partial(
        learning_rate, base_lr=0.025, iters=160000, warmup_iters=1000
    )  # mmseg 1.x's R18 against Ascend ModelZoo's form
    assert all(
        math.isclose(long(it, schedule="mmengine"), lr, rel_tol=1e-9)
        for it, lr in enumerate(chained_mmengine_lrs(0.025, 160000, 1000))
        if it % 997 == 0
    )
    assert (
        max(
            abs(long(it, schedule="mmengine") / long(it) - 1)
            for it in range(1000, 160000, 1000)
            if it < 150000
        )
        < 0.01
    )


def test_mmengine_schedule_refuses_an_exponential_warmup(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lr-schedule", "mmengine", "--warmup", "exp"])
    assert "--warmup exp" in capsys.readouterr().err


def test_loss_normalise_all_is_mmseg_mean_over_every_pixel():
    """mmseg's CrossEntropyLoss (avg_non_ignore=False): per-pixel CE, 0 where ignored, averaged over
    all pixels."""
    torch.manual_seed(2)
    outputs = [torch.randn(2, 5, 8, 8) for _ in range(3)]
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[:, :3] = IGNORE_INDEX
    valid = labels != IGNORE_INDEX

    def per_pixel(logits):
        return (
            -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=4)[:, None]).squeeze(1) * valid
        )

    every_pixel = sum(per_pixel(o).mean() for o in outputs)
    labelled = sum(per_pixel(o).sum() / valid.sum() for o in outputs)
    assert torch.allclose(segmentation_loss(outputs, labels, normalise="all"), every_pixel)
    assert torch.allclose(segmentation_loss(outputs, labels, normalise="valid"), labelled)
    assert math.isclose(every_pixel / labelled, valid.float().mean().item(), rel_tol=1e-5)


def test_ohem_keeps_hard_pixels_or_the_hardest_sixteenth():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 16) * 3
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :4] = IGNORE_INDEX
    per_pixel = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=4)[:, None]).squeeze(1)
    per_pixel[labels == IGNORE_INDEX] = 0
    values = np.sort(per_pixel.flatten().numpy())[::-1]
    n_min = int((labels != IGNORE_INDEX).sum()) // 16
    for thresh in (0.7, 0.999999, 1e-9):
        hard = values[values > -math.log(thresh)]
        expected = hard.mean() if len(hard) >= n_min else values[:n_min].mean()
        assert math.isclose(
            ohem_cross_entropy(logits, labels, thresh=thresh).item(), expected, rel_tol=1e-5
        )


@pytest.mark.parametrize(
    "loss_type, normalise", [("ce", "valid"), ("ce", "all"), ("ohem", "valid")]
)
def test_a_batch_without_labelled_pixels_adds_zero_loss_and_finite_gradients(loss_type, normalise):
    logits = [torch.randn(2, 5, 8, 8, requires_grad=True) for _ in range(3)]
    labels = torch.full((2, 8, 8), IGNORE_INDEX)
    loss = segmentation_loss(logits, labels, loss_type=loss_type, normalise=normalise)
    loss.backward()
    assert loss.item() == 0 and all(torch.equal(x.grad, torch.zeros_like(x)) for x in logits)


def test_loss_sums_main_and_weighted_aux_heads():
    torch.manual_seed(1)
    outputs = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    labels = torch.randint(0, 4, (2, 8, 8))
    expected = F.cross_entropy(outputs[0], labels) + 0.4 * (
        F.cross_entropy(outputs[1], labels) + F.cross_entropy(outputs[2], labels)
    )
    assert torch.allclose(segmentation_loss(outputs, labels, aux_weight=0.4), expected)


def test_sampler_shards_are_disjoint_and_resumable():
    full = [
        list(IterationSampler(20, batch_size=2, rank=r, world_size=2, seed=7, start=0, iters=10))
        for r in range(2)
    ]
    for it in range(5):  # one epoch = 5 iterations of 2 x 2 images
        indices = [i for r in range(2) for i, _ in full[r][it]]
        assert len(set(indices)) == 4
    epoch = {i for r in range(2) for batch in full[r][:5] for i, _ in batch}
    assert len(epoch) == 20
    assert (
        list(IterationSampler(20, batch_size=2, rank=1, world_size=2, seed=7, start=6, iters=10))
        == full[1][6:]
    )


def test_amp_o1_with_bf16_runs_bf16_convolutions_and_updates_fp32_weights():
    runtime = Runtime(
        torch.device("cpu"), amp_dtype=torch.bfloat16
    )  # the default on CPUs with native bf16
    torch.manual_seed(0)
    model = BiSeNetV1(ModelConfig(18)).train()
    dtypes = []
    model.head.conv.conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = model.head.conv.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    autocast = functools.partial(runtime.autocast, "O1")
    loss = train_step(
        model,
        optimizer,
        scaler=runtime.grad_scaler("O1"),
        images=images,
        labels=torch.randint(0, 19, (2, 64, 96)),
        loss_fn=segmentation_loss,
        autocast=autocast,
    )
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32
    assert model.head.conv.conv.weight.dtype == torch.float32
    assert not torch.equal(model.head.conv.conv.weight, before)


def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale():
    """O1 as on a GPU (fp16 autocast + dynamic loss scaling), run on the CPU: an overflowing step
    changes nothing."""
    runtime = Runtime(torch.device("cpu"), amp_dtype=torch.float16)
    torch.manual_seed(0)
    model = BiSeNetV1(ModelConfig(18, dropout=0.0)).train()
    dtypes = []
    model.head.conv.conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = runtime.grad_scaler("O1")
    assert scaler.is_enabled() and runtime.precision("O1") == "fp16 autocast"
    scaler.load_state_dict(
        {**scaler.state_dict(), "scale": 2.0**60}
    )  # scaled gradients cannot fit in fp16
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    images, labels = (
        torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8),
        torch.randint(0, 19, (2, 64, 96)),
    )
    autocast = functools.partial(runtime.autocast, "O1")
    train_step(
        model,
        optimizer,
        scaler=scaler,
        images=images,
        labels=labels,
        loss_fn=segmentation_loss,
        autocast=autocast,
    )
    assert dtypes == [torch.float16]
    assert (
        scaler.get_scale() == 2.0**59 and not optimizer.state
    )  # skipped: no momentum buffers were created
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**8})
    train_step(
        model,
        optimizer,
        scaler=scaler,
        images=images,
        labels=labels,
        loss_fn=segmentation_loss,
        autocast=autocast,
    )
    assert scaler.get_scale() == 2.0**8 and scaler.state_dict()["_growth_tracker"] == 1
    assert not torch.equal(model.head.conv.conv.weight, before["head.conv.conv.weight"])


@pytest.mark.slow
def test_fp16_overflows_are_logged_and_a_diverged_run_stops(synthetic_root, tmp_path):
    args = [
        "--data-root",
        str(synthetic_root),
        *SMALL,
        "--crop",
        "32x64",
        "--iters",
        "40",
        "--no-validate",
        "--amp-dtype",
        "float16",
        "--lr",
        "1e12",
    ]
    args += ["--warmup-iters", "0"]
    result = run_train([*args, "--work-dir", str(tmp_path / "wd")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "fp16 gradients overflowed, step skipped, loss scale 65536 -> 32768"
        in result.stderr + result.stdout
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the fp16 loss scale fell to 0.5 at iteration"), last
    overflows = [
        e
        for e in map(json.loads, (tmp_path / "wd" / "log.jsonl").read_text().splitlines())
        if e.get("overflow")
    ]
    assert [e["loss_scale"] for e in overflows] == [2.0**k for k in range(15, -2, -1)]
    assert overflows[-1]["iter"] == int(last.split("at iteration ")[1].split(":")[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "amp_dtype", ["bfloat16", "float16"]
)  # auto is one of them, or fp32 (no autocast)
def test_resume_is_bit_exact(synthetic_root, tmp_path, amp_dtype):
    common = [
        "--amp-dtype",
        amp_dtype,
        "--data-root",
        str(synthetic_root),
        *SMALL,
        "--iters",
        "4",
        "--ckpt-interval",
        "2",
        "--no-validate",
        "--warmup-iters",
        "2",
        "--lr",
        "0.01",
        "--workers",
        "1",
        "--crop",
        # half precision on purpose: tiny, since CPUs without native bf16/fp16 emulate it slowly
        "32x64",
    ]
    straight = run_train([*common, "--work-dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    interrupted = run_train([*common, "--work-dir", str(tmp_path / "b"), "--iters", "4"])
    assert interrupted.returncode == 0, interrupted.stderr
    # simulate a crash after the iteration-2 checkpoint: drop the later one and point latest back
    (tmp_path / "b" / "iter_4.pth").unlink()
    (tmp_path / "b" / "latest.pth").unlink()
    (tmp_path / "b" / "latest.pth").symlink_to("iter_2.pth")
    resumed = run_train([*common, "--work-dir", str(tmp_path / "b"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    a = torch.load(tmp_path / "a" / "iter_4.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "iter_4.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scaler"] == b["scaler"]
    assert bool(b["scaler"]) == (
        amp_dtype == "float16"
    )  # fp16: scale and growth tracker (overflows included) travel


@pytest.mark.slow
def test_two_process_ddp_update_equals_single_process_gradient_accumulation(
    synthetic_root, tmp_path
):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "train.py", "--data-root", str(synthetic_root)]
    cmd += [
        *SMALL,
        *"--iters 1 --no-validate --dropout 0 --amp O0 --lr 0.05 --channels-last".split(),
    ]
    cmd += ["--work-dir", str(tmp_path / "ddp"), "--warmup-iters", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIST_BACKEND": "gloo"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout)["world_size"] == 2
    ddp = torch.load(tmp_path / "ddp" / "iter_1.pth", weights_only=True)

    # Second path: one process, the same two per-rank micro-batches, gradients averaged, one SGD
    # step. Same thread count as the ranks: with 2 images per batch the BatchNorm on pooled maps
    # amplifies reduction-order rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seed = parse_args([]).seed
    torch.manual_seed(seed)
    model = BiSeNetV1(ModelConfig(18, dropout=0.0)).train().to(memory_format=torch.channels_last)
    dataset = open_dataset(
        synthetic_root,
        "train",
        dataset_type="cityscapes",
        transform=TrainTransform((64, 128), (0.5, 2.0), cat_max_ratio=0.75),
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=learning_rate(0, base_lr=0.05, iters=1),
        momentum=0.9,
        weight_decay=5e-4,
    )
    for rank in range(2):
        batch = next(
            iter(
                IterationSampler(
                    len(dataset), batch_size=2, rank=rank, world_size=2, seed=seed, start=0, iters=1
                )
            )
        )
        samples = [dataset[item] for item in batch]
        images = torch.stack([s["image"] for s in samples]).contiguous(
            memory_format=torch.channels_last
        )
        labels = torch.stack([s["label"] for s in samples]).long()
        (segmentation_loss(model(images), labels) / 2).backward()
    optimizer.step()
    torch.set_num_threads(threads)
    for name, value in model.named_parameters():
        torch.testing.assert_close(
            ddp["model"][name], value.detach(), rtol=1e-5, atol=1e-6, msg=name
        )


def share_buffers_in_rank(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    norm = nn.BatchNorm2d(3)
    norm.running_mean.fill_(rank + 1.0)
    norm.num_batches_tracked.fill_(10 + rank)
    Runtime(torch.device("cpu"), rank=rank, world_size=2, backend="gloo").share_buffers(norm)
    torch.save(norm.state_dict(), out / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_validation_first_gives_every_rank_the_statistics_of_rank_0(tmp_path):
    """DDP keeps buffers per rank (broadcast_buffers=False, as Ascend's port); before validation
    each rank takes rank 0's BatchNorm statistics, so the sharded val mIoU is that of the checkpoint
    rank 0 saves."""
    context, port = multiprocessing.get_context("fork"), free_port()
    ranks = [
        context.Process(target=share_buffers_in_rank, args=(rank, port, tmp_path))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(60)
    assert [process.exitcode for process in ranks] == [0, 0]
    states = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert (
        torch.equal(states[1]["running_mean"], torch.ones(3))
        and states[1]["num_batches_tracked"] == 10
    )
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow
def test_learning_from_scratch_on_synthetic_data(learned):
    """R18 from scratch on a small synthetic set: val mIoU well above chance within about a CPU
    minute."""
    _, work_dir, result = learned
    summary = last_json(result.stdout)
    curve = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    vals = [(e["iter"], round(e["val_mIoU"], 1)) for e in curve if "val_mIoU" in e]
    print("val mIoU curve (iter, mIoU):", vals, "train img/s:", summary["train_fps"])
    assert summary["mIoU"] > 25, vals
    assert vals[-1][1] > vals[0][1]


@pytest.mark.slow
def test_default_inference_path_agrees_with_fp32_on_the_trained_model(learned, tmp_path):
    """evaluate.py's default CPU path (BN folded, channels_last, O1: bf16 where native) against
    plain fp32."""
    root, _, result = learned
    checkpoint = last_json(result.stdout)["checkpoint"]
    results, predictions = {}, {}
    for amp in ("O0", "O1"):
        out = tmp_path / amp
        results[amp] = last_json(
            succeeded(
                "evaluate.py",
                "--ckpt",
                checkpoint,
                "--data-root",
                root,
                "--amp",
                amp,
                "--out-dir",
                out,
                "--format",
                "trainIds",
            )
        )
        predictions[amp] = np.stack([np.array(Image.open(p)) for p in sorted(out.rglob("*.png"))])
    agreement = (predictions["O0"] == predictions["O1"]).mean()
    print(
        f"O1 ({results['O1']['precision']}) vs fp32: pixel agreement {100 * agreement:.3f}%, "
        f"mIoU {results['O1']['mIoU']} vs {results['O0']['mIoU']}"
    )
    assert agreement >= 0.995
    assert abs(results["O1"]["mIoU"] - results["O0"]["mIoU"]) <= 0.3


@pytest.mark.slow
def test_non_finite_fp32_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path):
    args = [
        "--data-root",
        str(synthetic_root),
        *SMALL,
        "--iters",
        "6",
        "--no-validate",
        "--amp",
        "O0",
        "--lr",
        "1e15",
        "--warmup-iters",
        "0",
    ]
    result = run_train([*args, "--ckpt-interval", "1", "--work-dir", str(tmp_path / "wd")])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: loss is")
        and "last good checkpoint is kept" in last
        and "Traceback" not in result.stderr
    )
    failed_at = int(last.split("at iteration ")[1].split(";")[0])
    kept = torch.load(tmp_path / "wd" / "latest.pth", weights_only=True)
    assert (
        kept["iteration"] == failed_at - 1
    )  # iterations are 1-based in errors as in logs: the one before is the last good
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_1p.sh", "run_8p.sh"])
def test_launch_scripts_run_and_resume(synthetic_root, tmp_path, script):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # the scripts' own device lookup costs an interpreter start; tests/test_npu.py covers it
        "DEVICE": "cpu",
        "DATA_ROOT": str(synthetic_root),
        "WORK_DIR": str(tmp_path / "wd"),
        "NPROC": "2",
        "DIST_BACKEND": "gloo",
        "MASTER_PORT": str(free_port()),
    }
    overrides = ["perf", *SMALL, "--iters", "2", "--ckpt-interval", "1"]
    first = subprocess.run(
        ["bash", script, *overrides], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_json(first.stdout)["world_size"] == (2 if script == "run_8p.sh" else 1)
    again = subprocess.run(
        ["bash", script, *overrides[:-2], "--iters", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr + again.stdout and last_json(again.stdout)["iters"] == 3


@pytest.mark.parametrize("normalise", ["all", "valid"])
def test_class_weights_scale_each_pixels_term_in_every_head(normalise):
    """mmseg's weighted CE: sum over labelled pixels of w[y] * -log softmax(x)[y], divided by all
    pixels (all) or by the labelled ones (valid), written out here with log_softmax and gather."""
    torch.manual_seed(4)
    outputs = [torch.randn(2, 5, 6, 7) for _ in range(3)]
    labels = torch.randint(0, 5, (2, 6, 7))
    labels[:, 0] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.0])

    def manual(logits):
        valid = labels != 255
        nll = -logits.log_softmax(1).gather(1, labels.clamp(max=4)[:, None])[:, 0]
        return (weight[labels.clamp(max=4)] * nll)[valid].sum() / (
            valid.sum() if normalise == "valid" else labels.numel()
        )

    expected = manual(outputs[0]) + 0.4 * (manual(outputs[1]) + manual(outputs[2]))
    torch.testing.assert_close(
        segmentation_loss(
            outputs, labels, aux_weight=0.4, normalise=normalise, class_weight=weight
        ),
        expected,
    )
