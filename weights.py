"""Weights of other repositories, read into BiSeNetV1 (bisenet.py): CoinCheung/BiSeNet's released state dict and
mmsegmentation's released checkpoints (with the classes their meta records), and torchvision's ImageNet ResNets
(--pretrained). checkpoints.py imports it only when it is given such a file.
"""

import re

from bisenet import RESNET_LAYOUTS, ModelConfig
from cli import CheckpointError

# CoinCheung's Cityscapes statistics, published on 0..1 RGB; the model takes 0..255, so they are scaled by 255 here
CITYSCAPES_MEAN = tuple(255 * v for v in (0.3257, 0.3690, 0.3223))
CITYSCAPES_STD = tuple(255 * v for v in (0.2112, 0.2148, 0.2115))

# Each rule maps a foreign key (regex) to ours. Unmatched keys are reported, never silently dropped.
CONVBN = r"(conv|bn)\.(.+)"
COINCHEUNG_RULES = [
    (r"cp\.resnet\.(.+)", r"backbone.\1"),
    (r"cp\.arm(16|32)\.conv\." + CONVBN, r"arm\1.conv.\2.\3"),
    (r"cp\.arm(16|32)\.conv_atten\.(.+)", r"arm\1.attention.conv.\2"),
    (r"cp\.arm(16|32)\.bn_atten\.(.+)", r"arm\1.attention.bn.\2"),
    (r"cp\.conv_head(16|32)\.(.+)", r"refine\1.\2"),
    (r"cp\.conv_avg\.(.+)", r"global_context.\1"),
    (r"sp\.conv1\.(.+)", r"spatial_path.0.\1"),
    (r"sp\.conv2\.(.+)", r"spatial_path.1.\1"),
    (r"sp\.conv3\.(.+)", r"spatial_path.2.\1"),
    (r"sp\.conv_out\.(.+)", r"spatial_path.3.\1"),
    (r"ffm\.convblk\.(.+)", r"ffm.conv.\1"),
    (r"ffm\.conv\.(.+)", r"ffm.attention.conv.\1"),
    (r"ffm\.bn\.(.+)", r"ffm.attention.bn.\1"),
    (r"conv_out\.conv\.(.+)", r"head.conv.\1"),
    (r"conv_out\.conv_out\.(.+)", r"head.classifier.\1"),
    (r"conv_out(16|32)\.conv\.(.+)", r"aux_head\1.conv.\2"),
    (r"conv_out(16|32)\.conv_out\.(.+)", r"aux_head\1.classifier.\2"),
]
MMSEG_RULES = [
    (r"backbone\.context_path\.backbone\.(.+)", r"backbone.\1"),
    (r"backbone\.context_path\.arm(16|32)\.conv_layer\.(.+)", r"arm\1.conv.\2"),
    (r"backbone\.context_path\.arm(16|32)\.atten_conv_layer\.1\.(.+)", r"arm\1.attention.\2"),
    (r"backbone\.context_path\.conv_head(16|32)\.(.+)", r"refine\1.\2"),
    (r"backbone\.context_path\.gap_conv\.1\.(.+)", r"global_context.\1"),
    (r"backbone\.spatial_path\.layer([1-4])\.(.+)", lambda m: f"spatial_path.{int(m[1]) - 1}.{m[2]}"),
    (r"backbone\.ffm\.conv1\.(.+)", r"ffm.conv.\1"),
    (r"backbone\.ffm\.conv_atten\.0\.(.+)", r"ffm.attention.\1"),
    (r"decode_head\.convs\.0\.(.+)", r"head.conv.\1"),
    (r"decode_head\.conv_seg\.(.+)", r"head.classifier.\1"),
    (r"auxiliary_head\.0\.convs\.0\.(.+)", r"aux_head16.conv.\1"),
    (r"auxiliary_head\.0\.conv_seg\.(.+)", r"aux_head16.classifier.\1"),
    (r"auxiliary_head\.1\.convs\.0\.(.+)", r"aux_head32.conv.\1"),
    (r"auxiliary_head\.1\.conv_seg\.(.+)", r"aux_head32.classifier.\1"),
]
TORCHVISION_RULES = [(r"(conv1|bn1|layer[1-4])\.(.+)", r"\1.\2")]


def rename_keys(state, rules, source):
    renamed, unmatched = {}, []
    for key, value in state.items():
        for pattern, replacement in rules:
            new_key, hits = re.subn(f"^{pattern}$", replacement, key)
            if hits:
                renamed[new_key] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise CheckpointError(f"{source}: cannot map {len(unmatched)} keys, e.g. {unmatched[:5]}")
    return renamed


def infer_depth(state, source):
    """ResNet depth from backbone keys: block block type from conv3, block counts from layer indices."""
    blocks = tuple(1 + max((int(m[1]) for k in state if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.", k))), default=-1) for i in range(1, 5))
    block = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    for depth, layout in RESNET_LAYOUTS.items():
        if layout == (block, blocks):
            return depth
    raise CheckpointError(f"{source}: backbone with {block} blocks {blocks} is not a ResNet-18 or ResNet-50")


def foreign_state(checkpoint, source):
    """(ModelConfig, our state dict, the classes it records or None) of CoinCheung's released state dict or an mmseg
    {'state_dict', 'meta'}."""
    if "state_dict" in checkpoint:
        state, rules, extra = checkpoint["state_dict"], MMSEG_RULES, dict(ffm_attention_relu=True)
    elif any(k.startswith("cp.resnet.") for k in checkpoint):
        state, rules, extra = checkpoint, COINCHEUNG_RULES, dict(ffm_attention_relu=False, dropout=0.0, mean=CITYSCAPES_MEAN, std=CITYSCAPES_STD)
    else:
        raise CheckpointError(f"{source}: unknown layout (first keys {list(checkpoint)[:5]}); expected ours, CoinCheung's or mmseg's")
    state = rename_keys({k.removeprefix("module."): v for k, v in state.items()}, rules, source)
    if "head.classifier.weight" not in state:
        raise CheckpointError(f"{source}: no segmentation head weights found")
    config = ModelConfig(infer_depth(state, source), state["head.classifier.weight"].shape[0], **extra)
    return config, state, mmseg_dataset(checkpoint.get("meta"))


def backbone_state(state, source):
    """An ImageNet ResNet state dict in torchvision's format (or under 'state_dict'), fc.* dropped, for model.backbone."""
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return rename_keys({k: v for k, v in state.items() if not k.startswith("fc.")}, TORCHVISION_RULES, source)


def mmseg_dataset(meta):
    """The classes and palette an mmseg checkpoint records (0.x: meta CLASSES/PALETTE; 1.x: meta dataset_meta), as
    a dataset description, or None."""
    if not isinstance(meta, dict):
        return None
    names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names, palette = meta["dataset_meta"].get("classes"), meta["dataset_meta"].get("palette")
    if not names:
        return None
    return {"name": "from the checkpoint's mmseg meta", "class_names": list(names), "palette": [list(c) for c in palette] if palette else None}
