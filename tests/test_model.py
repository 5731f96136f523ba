import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import ROOT
from reference_models import CoinCheungBiSeNetV1, MmsegBiSeNetV1, TvResNet, randomize_batchnorm

from bisenet import IMAGENET_MEAN, IMAGENET_STD, BiSeNetV1, ModelConfig, fuse_bn
from checkpoints import load_backbone, load_model
from cli import CheckpointError
from model_info import count_parameters


def r18(**kw):
    torch.manual_seed(0)
    return BiSeNetV1(ModelConfig(18, **kw))


def normalized(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "depth, inference, total", [(18, 13_275_539, 13_425_721), (50, 56_873_299, 59_243_385)]
)
def test_parameter_counts_match_mmseg_configs(depth, inference, total):
    model = BiSeNetV1(ModelConfig(depth))
    assert count_parameters(model, with_aux=False) == inference
    assert count_parameters(model) == total


def test_odd_input_sizes_give_full_resolution_outputs():
    model = r18().train()
    outputs = model(torch.rand(2, 3, 527, 952) * 255)
    assert len(outputs) == 3
    assert all(o.shape == (2, 19, 527, 952) for o in outputs)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 527, 952) * 255)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 19, 527, 952)


def test_every_parameter_gets_a_gradient():
    # trained BatchNorm weights: at init the zero-initialised residual norms hold back their
    # branches' gradients
    model = randomize_batchnorm(r18(), torch.Generator().manual_seed(0)).train()
    main, aux16, aux32 = model(torch.rand(2, 3, 96, 160) * 255)
    (main.sum() + aux16.sum() + aux32.sum()).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing


def test_batch_of_one_in_training_names_the_fix():
    with pytest.raises(ValueError, match="batch-size >= 2"):
        r18().train()(torch.rand(1, 3, 64, 64))


def test_fused_batchnorm_equals_unfused():
    model = randomize_batchnorm(r18(), torch.Generator().manual_seed(1)).eval()
    images = torch.rand(1, 3, 128, 256) * 255
    with torch.no_grad():
        expected = model(images)
        fused = fuse_bn(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(images), expected, atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = randomize_batchnorm(
        r18(num_classes=7, ffm_attention_relu=False), torch.Generator().manual_seed(2)
    ).eval()
    torch.save(
        {"model_config": model.config.to_dict(), "model": model.state_dict()}, tmp_path / "ours.pth"
    )
    loaded = load_model(tmp_path / "ours.pth")[0]
    images = torch.rand(1, 3, 96, 192) * 255
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert not loaded.training and loaded.config == model.config


def test_checkpoints_of_earlier_versions_load(tmp_path):
    # the model_config dict train.py saved before ModelConfig existed (bisenet.model_config's keys
    # and lists)
    earlier = {
        "depth": 18,
        "num_classes": 7,
        "ffm_attention_relu": True,
        "dropout": 0.1,
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "spatial_channels": [64, 64, 64, 128],
        "context_channels": [128, 256, 512],
        "fusion_channels": 256,
        "head_channels": 256,
        "aux_channels": 64,
    }
    model = r18(num_classes=7)
    assert model.config.to_dict() == earlier
    torch.save({"model_config": earlier, "model": model.state_dict()}, tmp_path / "earlier.pth")
    assert load_model(tmp_path / "earlier.pth")[0].config == model.config


def test_a_model_config_of_another_program_is_a_one_line_error(tmp_path):
    model = r18()
    torch.save(
        {"model_config": {**model.config.to_dict(), "window_size": 7}, "model": model.state_dict()},
        tmp_path / "other.pth",
    )
    with pytest.raises(
        CheckpointError,
        match=r"other.pth: its model_config is not one this code knows \(\['window_size'\]\)",
    ):
        load_model(tmp_path / "other.pth")[0]


def test_torchvision_backbone_file_loads_strictly(tmp_path):
    reference = TvResNet(18)
    state = {
        **reference.state_dict(),
        "fc.weight": torch.zeros(1000, 512),
        "fc.bias": torch.zeros(1000),
    }
    torch.save(state, tmp_path / "resnet18.pth")
    model = r18()
    logs = []
    load_backbone(model, tmp_path / "resnet18.pth", log=logs.append)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)
    assert "resnet18.pth" in logs[0]
    torch.save(TvResNet(50).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError, match="resnet50.pth"):
        load_backbone(r18(), tmp_path / "resnet50.pth")


def test_coincheung_release_loads_and_gives_its_logits(tmp_path):
    reference = randomize_batchnorm(
        CoinCheungBiSeNetV1(19), torch.Generator().manual_seed(3)
    ).eval()
    torch.save(reference.state_dict(), tmp_path / "model_final_v1_city_new.pth")
    model = load_model(tmp_path / "model_final_v1_city_new.pth")[0]
    assert model.config.ffm_attention_relu is False and model.config.depth == 18
    images = torch.rand(1, 3, 128, 256) * 255
    # CoinCheung's own preprocessing as published: ToTensor (0..1), then Normalize with these 0..1
    # statistics
    published_mean, published_std = (0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115)
    with torch.no_grad():
        expected = reference(normalized(images / 255, published_mean, published_std))
        torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=1e-6)
        rounded = BiSeNetV1(
            dataclasses.replace(model.config, mean=(83.06, 94.10, 82.19), std=(53.87, 54.77, 53.93))
        )  # the old constants
        rounded.load_state_dict(model.state_dict())
        assert not torch.allclose(rounded.eval()(images), expected, atol=1e-6, rtol=1e-6)


# R50 is the slow half: R18 checks the same mapping in the fast tier
@pytest.mark.parametrize("depth", [18, pytest.param(50, marks=pytest.mark.slow)])
def test_mmseg_release_loads_and_gives_its_logits(tmp_path, depth):
    torch.manual_seed(depth)
    reference = randomize_batchnorm(
        MmsegBiSeNetV1(depth, 19), torch.Generator().manual_seed(4)
    ).eval()
    state = {
        "state_dict": reference.state_dict(),
        "meta": {"mmseg_version": "0.x", "CLASSES": ["road"] * 19},
    }
    torch.save(state, tmp_path / "mmseg.pth")
    model = load_model(tmp_path / "mmseg.pth")[0]
    assert model.config.depth == depth and model.config.ffm_attention_relu is True
    images = (
        torch.rand(1, 3, 100, 164) * 255
    )  # not a multiple of 32: mmseg resizes to exact sizes, as we do
    with torch.no_grad():
        torch.testing.assert_close(
            model(images),
            reference(normalized(images, IMAGENET_MEAN, IMAGENET_STD)),
            atol=2e-4,
            rtol=1e-4,
        )


def test_unmappable_and_broken_files_are_rejected_with_the_keys(tmp_path):
    state = CoinCheungBiSeNetV1(19).state_dict()
    state["cp.extra_branch.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(
        CheckpointError, match=r"odd.pth: cannot map 1 keys, e.g. \['cp.extra_branch.weight'\]"
    ):
        load_model(tmp_path / "odd.pth")[0]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a loadable"):
        load_model(tmp_path / "junk.pth")[0]
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pth")[0]


@pytest.mark.slow
def test_cli_prints_parameters_and_flops():
    out = subprocess.run(
        [sys.executable, "tools/model_info.py", "--depth", "18", "--size", "512x1024"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "13,275,539 parameters for inference, 13,425,721 with aux heads" in out
    assert "59.2 GFLOPs" in out  # 236.7 at 1024x2048, a quarter of the pixels


@pytest.mark.parametrize(
    "small, size",
    [((64, 128), (512, 1024)), ((17, 30), (527, 952)), ((33, 60), (264, 480)), ((8, 8), (5, 7))],
)
def test_training_upsampling_equals_interpolate_values_and_gradients(small, size):
    from bisenet import bilinear_resize

    x = torch.randn(2, 3, *small, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = bilinear_resize(x.float(), size)
    (got_grad,) = torch.autograd.grad(got, x, grad.float())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-4, rtol=1e-5)


def test_backbone_url_is_served_from_the_torch_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = TvResNet(18)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-cached.pth")
    model = r18()
    load_backbone(
        model, "https://download.pytorch.org/models/resnet18-cached.pth", log=lambda _: None
    )  # no network here
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize(
    "depth, last_bn", [(18, "bn2"), pytest.param(50, "bn3", marks=pytest.mark.slow)]
)
def test_initialisation_follows_mmseg_from_scratch_rules(depth, last_bn):
    """mmseg 0.x's rules, written out from its code rather than ours: mmcv's ConvModule and ResNet
    init every convolution with kaiming_init (normal, mode fan_out, ReLU gain: std sqrt(2 / (out x
    kh x kw)), bias 0) and every norm with constant 1 / 0; ResNet's zero_init_residual sets the last
    norm of each block (BasicBlock norm2, Bottleneck norm3) to 0; FCNHead's conv_seg is normal(0,
    0.01) with bias 0, but only the main head's: the auxiliary FCNHeads sit in a torch nn.ModuleList
    (mmseg/models/segmentors/encoder_decoder.py, _init_auxiliary_head), and BaseModule.init_weights
    (mmcv/runner/base_module.py in mmcv 1.x, mmengine's in 1.x) calls init_weights only on children
    that have it, which nn.ModuleList has not: their conv_seg keeps nn.Conv2d's own init, weight and
    bias uniform within +-1/sqrt(fan_in) (Kaiming uniform with a=sqrt(5))."""
    torch.manual_seed(0)
    model = BiSeNetV1(ModelConfig(depth))
    residual_last = re.compile(rf"backbone\.layer\d\.\d+\.{last_bn}$")
    zeroed = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name.startswith("aux_head") and name.endswith("classifier"):
            bound, fan_in = 1 / math.sqrt(m.in_channels), m.in_channels
            for values in (m.weight.detach().double().flatten(), m.bias.detach().double()):
                assert 0.8 * bound < values.abs().max() <= bound, name
            w = m.weight.detach().double().flatten()
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1 and fan_in in (64, 256), (
                name
            )  # a uniform's std
            kurtosis = (((w - w.mean()) / w.std()) ** 4).mean().item()
            assert abs(kurtosis - 1.8) < 8 * math.sqrt(24 / w.numel()) / 4, (name, kurtosis)
        elif isinstance(m, nn.Conv2d):
            w = m.weight.detach().double().flatten()
            if name.endswith("classifier"):
                expected_std, tolerance = 0.01, 0.1
            else:
                expected_std, tolerance = (
                    math.sqrt(2 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1])),
                    0.05,
                )
            assert abs(w.std().item() / expected_std - 1) < tolerance, name
            assert abs(w.mean().item()) < 4 * expected_std / math.sqrt(w.numel()), name
            kurtosis = (
                (((w - w.mean()) / w.std()) ** 4).mean().item()
            )  # 3 for a normal, 1.8 for a uniform distribution
            assert abs(kurtosis - 3) < 8 * math.sqrt(24 / w.numel()), (name, kurtosis)
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, nn.BatchNorm2d):
            gamma = 0.0 if residual_last.search(name) else 1.0
            zeroed += gamma == 0.0
            assert torch.equal(m.weight, torch.full_like(m.weight, gamma)) and not m.bias.any(), (
                name
            )
            assert not m.running_mean.any() and torch.equal(
                m.running_var, torch.ones_like(m.running_var)
            ), name
    assert zeroed == (8 if depth == 18 else 16)


def test_pretrained_backbone_replaces_the_zero_initialised_residual_norms(tmp_path):
    torch.manual_seed(1)
    reference = TvResNet(18)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = r18()
    load_backbone(model, str(tmp_path / "resnet18.pth"), log=lambda _: None)
    assert torch.equal(
        model.backbone.layer1[0].bn2.weight, reference.state_dict()["layer1.0.bn2.weight"]
    )
