"""Export a BiSeNetV1 checkpoint for deployment: ONNX, or OpenVINO IR (fp32 or int8), each checked against PyTorch.

    python tools/export.py --ckpt work_dirs/r18/latest.pth --out bisenetv1.onnx --size 1024x2048
    python tools/export.py --ckpt model.pth --out bisenetv1.onnx --dynamic --argmax     # any H/W, uint8 class map out
    python tools/export.py --ckpt model.pth --format openvino --out bisenetv1.xml                      # fp32 weights
    python tools/export.py --ckpt model.pth --format openvino --int8 --calib-data data/cityscapes --out r18_int8.xml

Every graph takes a float32 RGB image Nx3xHxW with values 0..255 (normalisation and folded BatchNorm inside).
ONNX returns logits NxCxHxW (with --argmax the NxHxW uint8 class map); OpenVINO returns the class map ("classes")
and the 1/8-size logits ("logits"), for any batch, height and width. Each file records the model's classes,
palette, input size and source, so `python tools/deploy.py --model FILE` needs nothing else. --int8 calibrates NNCF
on --calib-images training images of --calib-data, resized to --size. Runtimes: pip install onnx onnxscript
onnxruntime (ONNX), pip install openvino nncf (OpenVINO).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from bisenet import fuse_bn
from checkpoints import load_model
from cityscapes import open_dataset
from cli import atomic_write, publish_new
from datasets import DataError
from deploy import METADATA_KEY, DeployGraph, OpenVinoModel, optional_import, to_openvino


class ArgmaxHead(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images).argmax(1).to(torch.uint8)


def export_metadata(model, info, *, size, precision, source):
    """What an exported file records about itself (deploy.py reads it)."""
    return {
        "model_config": model.config.to_dict(),
        "dataset": info.to_dict(),
        "size": list(size),
        "precision": precision,
        "source": str(source),
    }


# -- ONNX -------------------------------------------------------------------------------------------------------
def export(model, out, *, size, dynamic=False, argmax=False, opset=18, metadata=None):
    """torch.export-based exporter (needs onnxscript); dynamic height/width keep BiSeNet's any-size resizing.
    Written under a temporary name and renamed once the metadata is in."""
    model = fuse_bn(model.eval())
    graph = ArgmaxHead(model).eval() if argmax else model
    sample = torch.randint(0, 256, (1, 3, *size)).float()
    shapes = (
        {
            "images": {
                2: torch.export.Dim("height", min=32, max=8192),
                3: torch.export.Dim("width", min=32, max=8192),
            }
        }
        if dynamic
        else None
    )
    with atomic_write(out, replace=False, suffix=".tmp.onnx") as temp:
        torch.onnx.export(
            graph,
            (sample,),
            temp,
            input_names=["images"],
            output_names=["output"],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=False,  # one self-contained file, no NAME.data beside it
        )
        if metadata is not None:
            onnx = optional_import("onnx")
            proto = onnx.load(temp)
            onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
            onnx.save(proto, temp)
    return graph


def check_parity(graph, out, *, size):
    """Max |logit difference| and argmax agreement between onnxruntime and PyTorch on one random image."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: parity not checked (pip install onnxruntime)")
        return None
    images = torch.randint(0, 256, (1, 3, *size)).float()
    with torch.no_grad():
        expected = graph(images)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    if got.dtype == torch.uint8:
        return {"argmax_agreement": (got == expected).float().mean().item()}
    return {
        "max_abs_logit_diff": (got - expected).abs().max().item(),
        "argmax_agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item(),
    }


def written_opset(out):
    import onnx

    return next(
        entry.version
        for entry in onnx.load(out, load_external_data=False).opset_import
        if entry.domain in ("", "ai.onnx")
    )


def export_onnx(model, out, *, size, dynamic, argmax, opset, metadata):
    try:
        graph = export(
            model, out, size=size, dynamic=dynamic, argmax=argmax, opset=opset, metadata=metadata
        )
        opset_written = written_opset(out)
    except ImportError as e:
        raise cli.UsageError(
            f"ONNX export needs the optional extras ({e}); pip install onnx onnxscript onnxruntime"
        ) from None
    if opset_written != opset:
        raise cli.UsageError(
            f"asked for opset {opset}, but the exporter wrote opset {opset_written} to {out}; pass --opset {opset_written}"
        )
    parity = check_parity(graph, out, size=size)
    if parity:
        print(
            f"onnxruntime vs PyTorch at {size[0]}x{size[1]}: "
            + ", ".join(f"{k} {v:.6g}" for k, v in parity.items())
        )
    return {
        "onnx": str(out),
        "opset": opset_written,
        "dynamic": dynamic,
        "argmax": argmax,
        **(parity or {}),
    }


# -- OpenVINO ---------------------------------------------------------------------------------------------------
def calibration_images(root, dataset_type, *, count, size, num_classes):
    """`count` training images spread evenly over the split, resized to `size` (bilinear): float32 1x3xHxW arrays."""
    dataset = open_dataset(root, "train", dataset_type=dataset_type, with_labels=False)
    if len(dataset) == 0:
        raise DataError(
            f"--calib-data {root}: its train split has no images to calibrate int8 on; pass the data root the model was trained on"
        )
    if dataset.info.num_classes != num_classes:
        raise cli.UsageError(
            f"--calib-data {root}: {dataset.info.name} has {dataset.info.num_classes} classes, the model {num_classes}; calibrate on its own data"
        )
    picks = sorted(
        {int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()}
    )
    images = []
    for index in picks:
        image = dataset[index]["image"][None].float()
        if tuple(image.shape[2:]) != tuple(size):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        images.append(image.numpy())
    return images


def quantize_int8(ov_model, images):
    """NNCF post-training quantisation (weights and activations int8), calibrated on `images` (float32 1x3xHxW
    arrays of real training images)."""
    nncf = optional_import("nncf")
    return nncf.quantize(ov_model, nncf.Dataset(images), subset_size=len(images))


def save_openvino(ov_model, out, *, metadata):
    """xml + bin written under temporary names, then published without replacing anything: the bin first and the xml,
    what a reader opens, last, so that no reader ever sees a half-written or mismatched pair."""
    ov = optional_import("openvino")
    out = Path(out)
    ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    with atomic_write(out, replace=False, suffix=".tmp.xml") as temp:
        try:
            try:
                ov.save_model(ov_model, temp, compress_to_fp16=False)
            except (
                RuntimeError
            ) as e:  # OpenVINO's C++ stream errors ("basic_ios::clear") say nothing of the cause
                free = shutil.disk_usage(out.parent).free // 2**20
                raise cli.UsageError(
                    f"{out}: OpenVINO could not write the model ({cli.first_line(e)}); {free} MB are free in {out.parent.resolve()}"
                ) from None
            publish_new(temp.with_suffix(".bin"), out.with_suffix(".bin"))
        finally:
            temp.with_suffix(".bin").unlink(missing_ok=True)


def check_openvino(graph, float_model, *, written, metadata, image):
    """The float graph run in f32 against PyTorch (logits), and what was written, at OpenVINO's default precision
    (and int8 if quantised), against PyTorch fp32 (class map)."""
    with torch.no_grad():
        expected_classes, expected_logits = graph(image)
    _, logits = OpenVinoModel(float_model, metadata, precision="f32").run(image)
    deployed = OpenVinoModel(written, metadata)
    classes, _ = deployed.run(image)
    return {
        "max_abs_logit_diff_f32": float(np.abs(logits - expected_logits.numpy()).max()),
        "class_agreement": float((classes == expected_classes.numpy()).mean()),
        "runtime_precision": deployed.precision,
    }


def export_openvino(model, out, *, size, metadata, calibration):
    """fp32 IR, or int8 when calibration images are given. The parity image is the first calibration image (a real
    one), else random."""
    started = time.perf_counter()
    float_model = to_openvino(model)
    converted_s = time.perf_counter() - started
    written = quantize_int8(float_model.clone(), calibration) if calibration else float_model
    if calibration and not any(op.get_type_name() == "FakeQuantize" for op in written.get_ops()):
        raise cli.UsageError(
            "--int8: NNCF quantised no layer of the model, so the IR would be fp32; nothing was written"
        )
    quantized_s = time.perf_counter() - started - converted_s
    save_openvino(written, out, metadata=metadata)
    image = (
        torch.from_numpy(calibration[0])
        if calibration
        else torch.randint(0, 256, (1, 3, *size)).float()
    )
    parity = check_openvino(
        DeployGraph(model), float_model, written=written, metadata=metadata, image=image
    )
    print(
        f"OpenVINO vs PyTorch at {size[0]}x{size[1]} ({'a training image' if calibration else 'a random image'}): f32 logits max |diff| "
        f"{parity['max_abs_logit_diff_f32']:.3g}; class map of {parity['runtime_precision']}: {100 * parity['class_agreement']:.2f}% agree with fp32"
    )
    timing = {
        "convert_s": round(converted_s, 2),
        **(
            {"quantize_s": round(quantized_s, 2), "calib_images": len(calibration)}
            if calibration
            else {}
        ),
    }
    return {
        "openvino": str(out),
        "bin": str(Path(out).with_suffix(".bin")),
        "precision": metadata["precision"],
        **timing,
        **parity,
    }


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--format", default="onnx", choices=("onnx", "openvino"))
    parser.add_argument(
        "--out", help="default: bisenetv1.onnx, or bisenetv1.xml (+ .bin) with --format openvino"
    )
    parser.add_argument(
        "--size",
        type=cli.size,
        default="1024x2048",
        help="HxW recorded as the input size, of calibration and of the parity check",
    )
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="ONNX: height and width as dynamic axes (OpenVINO's always are)",
    )
    parser.add_argument(
        "--argmax", action="store_true", help="ONNX: output the uint8 class map instead of logits"
    )
    parser.add_argument(
        "--opset",
        type=cli.integer(18),
        default=18,
        help="ONNX opset; torch's exporter writes 18 or newer",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="OpenVINO: quantise to int8 with NNCF (needs --calib-data)",
    )
    parser.add_argument(
        "--calib-data",
        help="data root whose training images calibrate --int8 (the model's own dataset)",
    )
    parser.add_argument(
        "--calib-images",
        type=cli.integer(1, 300),
        default=8,
        help="calibration images (their time: PERFORMANCE.md)",
    )
    parser.add_argument(
        "--dataset", default="auto", choices=cli.DATASET_TYPES, help="layout of --calib-data"
    )
    args = parser.parse_args(argv)
    args.out = args.out or ("bisenetv1.xml" if args.format == "openvino" else "bisenetv1.onnx")
    out, suffix = Path(args.out), ".xml" if args.format == "openvino" else ".onnx"
    if out.suffix != suffix:
        parser.error(
            f"argument --out: {out} does not end in {suffix}, which --format {args.format} writes"
        )
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        parser.error(
            f"argument --out: cannot write {out} ({'a folder' if out.is_dir() else 'its folder is missing or read-only'}); pass a writable file path"
        )
    for path in (out, out.with_suffix(".bin")) if args.format == "openvino" else (out,):
        if path.exists():
            parser.error(
                f"argument --out: {path} exists; pass another --out or remove it (an exported model is never overwritten)"
            )
    if not all(32 <= side <= 8192 for side in args.size):
        parser.error(
            f"argument --size: {args.size[0]}x{args.size[1]}: each side must be 32 to 8192 pixels"
        )
    if args.int8 and args.format != "openvino":
        parser.error("argument --int8: int8 export is OpenVINO's; add --format openvino")
    if args.int8 != bool(args.calib_data):
        parser.error(
            "--int8 and --calib-data go together: int8 is calibrated on real training images, never on random ones"
        )
    if args.format == "openvino" and (args.dynamic or args.argmax):
        parser.error(
            "--dynamic and --argmax are ONNX options: the OpenVINO model always takes any size and returns the class map"
        )
    return args


def export_checkpoint(args):
    model, info = load_model(args.ckpt)
    metadata = export_metadata(
        model, info, size=args.size, precision="int8" if args.int8 else "fp32", source=args.ckpt
    )
    try:
        if args.format == "onnx":
            result = export_onnx(
                model,
                args.out,
                size=args.size,
                dynamic=args.dynamic,
                argmax=args.argmax,
                opset=args.opset,
                metadata=metadata,
            )
        else:
            calibration = (
                calibration_images(
                    args.calib_data,
                    args.dataset,
                    count=args.calib_images,
                    size=args.size,
                    num_classes=info.num_classes,
                )
                if args.int8
                else None
            )
            result = export_openvino(
                model, args.out, size=args.size, metadata=metadata, calibration=calibration
            )
    except FileExistsError:
        raise cli.UsageError(
            f"{args.out} appeared while the model was exported; it was kept, not replaced: pass another --out"
        ) from None
    except OSError as e:
        raise cli.UsageError(
            f"{args.out}: could not write the exported model ({e.strerror or e}); nothing was left behind"
        ) from None
    print(f"{args.out}: {info.num_classes} classes of {info.name}: {', '.join(info.class_names)}")
    print(
        json.dumps(
            {
                **result,
                "size": f"{args.size[0]}x{args.size[1]}",
                "dataset": info.name,
                "classes": list(info.class_names),
            }
        )
    )


def main(argv=None):
    cli.main(lambda: export_checkpoint(parse_args(argv)))


if __name__ == "__main__":
    main()
