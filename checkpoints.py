"""Reading weights: this project's checkpoints and other repositories' (interop.py), and the state a
training checkpoint carries into a resumed or fine-tuned run. Writing them is workdir.py's."""

import dataclasses
import re
from pathlib import Path

import torch

import cli
from bisenet import BiSeNetV1, ModelConfig
from cityscapes import CITYSCAPES, NUM_CLASSES
from cli import CheckpointError
from datasets import DatasetInfo, first_difference, unnamed_classes, voc_palette

TRAINING_KEYS = ("model_config", "model", "optimizer", "scaler", "iteration", "best_miou")


def non_finite(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix in (".xml", ".bin", ".onnx", ".param"):
        how = f"python tools/deploy.py takes it as --model {path}, training needs a .pth"
        raise CheckpointError(f"{path}: an exported model, not a PyTorch checkpoint; {how}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, text, or a pickle of more than weights
        error = e  # said below, without torch's advice of weights_only=False: it runs the file
    try:  # the Python classes its pickle would build: torch scans the file without running it
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all: nothing to scan
        unsafe = []
    if unsafe:
        objects = ", ".join(unsafe[:3])
        never = "which are never unpickled here; re-save its state_dict"
        raise CheckpointError(f"{path}: holds Python objects ({objects}) besides weights, {never}")
    kind = type(error).__name__
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    reason = detail[1][:200] if detail else cli.first_line(error, 200)
    reason = "" if "weights_only" in reason or reason == kind else f": {reason}"
    raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({kind}{reason})")


def load_model(path):
    """(model in eval mode, the DatasetInfo of its classes) of our checkpoints, CoinCheung's
    released state dict or mmseg's {'state_dict', 'meta'}, loaded strictly. Weights saved without
    a dataset description are Cityscapes' for 19 classes, else numbered classes of a VOC palette."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected a dict of weights, got {kind}")
    if "model_config" in checkpoint:
        config = ModelConfig.from_dict(checkpoint["model_config"], path)
        state, description = checkpoint["model"], checkpoint.get("dataset")
    else:
        from interop import foreign_state  # other repositories' layouts, read only for their files

        config, state, description = foreign_state(checkpoint, path)
    model = BiSeNetV1(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        misfit = f"weights do not fit the model: {cli.first_line(e)}"
        raise CheckpointError(f"{path}: {misfit}") from None
    if bad := non_finite(state):
        where = f"{len(bad)} weight tensors hold NaN or inf (first: {bad[0]})"
        fix = "it comes from a diverged run, use an earlier checkpoint"
        raise CheckpointError(f"{path}: {where}; {fix}")
    model, num_classes = model.eval(), config.num_classes
    if not description:
        return model, CITYSCAPES if num_classes == NUM_CLASSES else unnamed_classes(num_classes)
    try:
        palette = description.get("palette") or voc_palette(len(description["class_names"]))
        info = DatasetInfo.from_dict({**description, "palette": palette})
        colours_ok = all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
        if len(info.palette) != info.num_classes or not colours_ok:
            raise ValueError("palette does not fit the classes")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        malformed = f"its dataset description is malformed ({cli.first_line(e)})"
        fix = "re-save it, or load it with --load-from in train.py"
        raise CheckpointError(f"{path}: {malformed}; {fix}") from None
    if info.num_classes != num_classes:
        names = f"names {info.num_classes} classes, the model has {num_classes}"
        raise CheckpointError(f"{path}: its dataset description {names}")
    return model, info


def load_backbone(model, source, *, log=print):
    """ImageNet ResNet weights in torchvision's layout (fc.* ignored), from a path or cached URL."""
    if re.match(r"^https?://", str(source)):
        try:
            state = torch.hub.load_state_dict_from_url(
                str(source), map_location="cpu", weights_only=True, progress=False
            )
        # URLError, HTTPError, a timeout, or a download that is not a checkpoint
        except (OSError, RuntimeError) as e:
            reason = getattr(e, "reason", None) or cli.first_line(e, 200)
            failed = f"could not download the backbone weights ({reason})"
            fix = "check the URL and the network, or pass a local file"
            raise CheckpointError(f"{source}: {failed}; {fix}") from None
    else:
        state = read_checkpoint(source)
    from interop import backbone_state  # torchvision's layout, read only with --pretrained

    state = backbone_state(state, source)
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: backbone does not fit: {cli.first_line(e)}") from None
    log(f"loaded ImageNet backbone from {source}: {len(state)} tensors")


def initial_weights(path, config, *, log):
    """(ModelConfig, state dict) for --load-from: a checkpoint's model with `config`'s dropout and
    classes; on other classes its classifiers (BiSeNetV1.classifiers) start afresh."""
    source = load_model(path)[0]
    depth = source.config.depth
    if depth != config.depth:
        raise CheckpointError(f"{path}: a ResNet-{depth} model; pass --depth {depth}")
    asked = dict(dropout=config.dropout, num_classes=config.num_classes)
    config = dataclasses.replace(source.config, **asked)  # its fusion variant, input normalisation
    state = source.state_dict()
    if source.config.num_classes != config.num_classes:
        classifiers = BiSeNetV1(config).classifiers()
        state = {k: v for k, v in state.items() if not k.startswith(classifiers)}
        was = f"{source.config.num_classes} classes, the data has {config.num_classes}"
        log(f"{path}: {was}: the {len(classifiers)} classifier layers are re-initialised")
    log(f"initial weights from {path}")
    return config, state


def restore(checkpoint, path, *, model, optimizer, scaler, runtime, info):
    """(iteration, best mIoU) of a training checkpoint loaded into the model, optimizer and scaler.
    Only a run's own model and classes go on with it: its best mIoU compares their data."""
    saved_config = ModelConfig.from_dict(checkpoint["model_config"], path)
    if saved_config != model.config:
        # depth and classes come first in ModelConfig: flags set them
        ours = dataclasses.asdict(model.config)
        saved = dataclasses.asdict(saved_config).items()
        changed = [f"{name} {was} -> {ours[name]}" for name, was in saved if was != ours[name]]
        more = f" and {len(changed) - 2} settings that follow from them" if len(changed) > 2 else ""
        other = f"a run of another model configuration ({', '.join(changed[:2])}{more})"
        raise CheckpointError(f"{path}: {other}; pass a new --work-dir, or the flags of that run")
    saved_classes = tuple((checkpoint.get("dataset") or {}).get("class_names") or ())
    if saved_classes and saved_classes != info.class_names:
        k, ours, theirs = first_difference(saved_classes, info.class_names)
        other = f"class {k} was {ours!r}, the data's is {theirs!r}"
        fix = f"pass a new --work-dir, or --load-from {path} to fine-tune on this data"
        raise CheckpointError(f"{path}: a run on other classes ({other}); {fix}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when that run had no loss scaling (bf16 or fp32)
        runtime.load_scaler_state(scaler, checkpoint["scaler"])
    return checkpoint["iteration"], checkpoint["best_miou"]
