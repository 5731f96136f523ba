"""Export a BiSeNetV1 checkpoint for deployment: ONNX, OpenVINO IR (fp32 or int8) or ncnn, each
checked against PyTorch.

    python tools/export.py --ckpt work_dirs/r18/latest.pth --out bisenetv1.onnx --size 1024x2048
    python tools/export.py --ckpt m.pth --out bisenetv1.onnx --dynamic --argmax  # any H/W, classes
    python tools/export.py --ckpt m.pth --out r18_trt.onnx --opset 17 --simplify  # TensorRT 8.x
    python tools/export.py --ckpt m.pth --format openvino --out bisenetv1.xml     # fp32 weights
    python tools/export.py --ckpt m.pth --format openvino --int8 --calib-data data/cityscapes \\
        --out r18_int8.xml
    python tools/export.py --ckpt m.pth --format ncnn --out bisenetv1.param       # + .bin, .json

Every graph takes a float32 RGB image Nx3xHxW with values 0..255 (normalisation and folded BatchNorm
inside). ONNX returns logits NxCxHxW (with --argmax the NxHxW class map: uint8, int32 at opset 17 or
lower, which TensorRT 8.x takes); OpenVINO returns the class map ("classes") and the 1/8-size logits
("logits"), for any batch, height and width; ncnn (through pnnx) returns the logits of one image
CxHxW, for any height and width. Each model records the model's classes, palette, input size and
source (ncnn in NAME.json beside NAME.param and NAME.bin), so `python tools/deploy.py --model FILE`
needs nothing else.

ONNX at opset 18 or newer goes through torch's torch.export-based exporter; at 17 or lower (what
TensorRT 8.x and most Jetson images parse) through its TorchScript exporter, and every node is then
checked against TensorRT 8.6's ONNX operator support. --int8 calibrates NNCF on --calib-images
training images of --calib-data, resized to --size. Runtimes: pip install onnx onnxscript
onnxruntime (ONNX; onnxslim for --simplify), pip install openvino nncf (OpenVINO), pip install pnnx
ncnn (ncnn).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
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
from deploy import (
    METADATA_KEY,
    DeployGraph,
    NcnnModel,
    OpenVinoModel,
    ncnn_files,
    optional_import,
    to_openvino,
)

# TensorRT 8.6's ONNX parser: the operators its support matrix marks supported, for checking --opset
# 17 files. Source: onnx/onnx-tensorrt, docs/operators.md of the 8.5 release ("TensorRT 8.5 supports
# operators up to Opset 17",
# https://github.com/onnx/onnx-tensorrt/blob/6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc/docs/operators.md)
# plus the three operators that docs/Changelog.md's "TensorRT 8.6 EA Release - 2023-3-13" adds
# (GroupNormalization, LayerNormalization, IsInf; the 8.6 GA entry adds none), i.e. the matrix of
# https://github.com/onnx/onnx-tensorrt/blob/release/8.6-GA/docs/operators.md ("TensorRT 8.6
# supports operators up to Opset 17").
TENSORRT_8_6_OPSET = 17
TENSORRT_8_6_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HardSigmoid HardSwish Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod
    Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
    Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
    """.split()
)
# The same page's restrictions on Resize, the one operator here that has them, and its data types:
# DOUBLE, FLOAT32, FLOAT16, INT8 and BOOL, with INT32 and INT64 cast down ("limited support").
TENSORRT_8_6_RESIZE = {
    "mode": {"nearest", "linear"},
    "coordinate_transformation_mode": {
        "half_pixel",
        "pytorch_half_pixel",
        "tf_half_pixel_for_nn",
        "asymmetric",
        "align_corners",
    },
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
}
ONNX_RESIZE_DEFAULTS = {
    "mode": "nearest",
    "coordinate_transformation_mode": "half_pixel",
    "nearest_mode": "round_prefer_floor",
}
TENSORRT_8_6_TYPES = ("DOUBLE", "FLOAT", "FLOAT16", "INT8", "BOOL", "INT32", "INT64")
DYNAMO_MIN_OPSET = 18  # torch's torch.export-based exporter writes no older opset


class ArgmaxHead(torch.nn.Module):
    def __init__(self, model, dtype=torch.uint8):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images):
        return self.model(images).argmax(1).to(self.dtype)


def export_metadata(model, info, *, size, precision, source):
    """What an exported file records about itself (deploy.py reads it)."""
    return {
        "model_config": model.config.to_dict(),
        "dataset": info.to_dict(),
        "size": list(size),
        "precision": precision,
        "source": str(source),
    }


def second_size(size):
    """A size that is not the export's nor a multiple of 32: where a dynamic model proves it takes
    any size."""
    return tuple(max(32, side * 3 // 4 + 5) for side in size)


def random_images(size, batch=1):
    return torch.randint(0, 256, (batch, 3, *size)).float()


# -- ONNX ------------------------------------------------------------------------------------------
def dynamo_export(graph, sample, temp, *, dynamic, opset):
    """torch.export-based (needs onnxscript); dynamic height/width keep BiSeNet's any-size
    resizing."""
    shapes = None
    if dynamic:
        sides = {
            2: torch.export.Dim("height", min=32, max=8192),
            3: torch.export.Dim("width", min=32, max=8192),
        }
        shapes = {"images": sides}
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


def torchscript_export(graph, sample, temp, *, dynamic, opset):
    """The TorchScript exporter, which writes the opsets before 18 that the torch.export one
    cannot."""
    axes = {"images": {2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():
        # its deprecation notice, and the tracer's note on the Python-level `size if upsample` (a
        # constant)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (sample,),
            str(temp),
            input_names=["images"],
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def export(
    model, out, *, size, dynamic=False, argmax=False, opset=18, simplify=False, metadata=None
):
    """Written under a temporary name and renamed once simplified and the metadata is in. Returns
    the PyTorch graph that the file computes."""
    model = fuse_bn(model.eval())
    # TensorRT 8.x, which opsets before 18 are for, has no uint8 tensors
    head = torch.uint8 if opset >= DYNAMO_MIN_OPSET else torch.int32
    graph = ArgmaxHead(model, head).eval() if argmax else model
    writer = dynamo_export if opset >= DYNAMO_MIN_OPSET else torchscript_export
    with atomic_write(out, replace=False, suffix=".tmp.onnx") as temp:
        writer(graph, random_images(size), temp, dynamic=dynamic, opset=opset)
        if simplify or metadata is not None:
            onnx = optional_import("onnx")
            proto = onnx.load(temp)
            if simplify:
                proto = optional_import("onnxslim").slim(proto)
            if metadata is not None:
                onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
            onnx.save(proto, temp)
    return graph


def check_parity(graph, out, *, sizes):
    """Max |logit difference| and argmax agreement between onnxruntime and PyTorch, one random image
    per size (the worst over the sizes)."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: parity not checked (pip install onnxruntime)")
        return None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    diffs, agreements = [], []
    for size in sizes:
        images = random_images(size)
        with torch.no_grad():
            expected = graph(images)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        if got.ndim == 3:  # the class map of --argmax
            agreements.append((got.long() == expected.long()).float().mean().item())
            continue
        diffs.append((got - expected).abs().max().item())
        agreements.append((got.argmax(1) == expected.argmax(1)).float().mean().item())
    return {
        **({"max_abs_logit_diff": max(diffs)} if diffs else {}),
        "argmax_agreement": min(agreements),
    }


def written_opset(out):
    import onnx

    return next(
        entry.version
        for entry in onnx.load(out, load_external_data=False).opset_import
        if entry.domain in ("", "ai.onnx")
    )


def resize_problems(node):
    onnx = optional_import("onnx")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    problems = []
    for name, allowed in TENSORRT_8_6_RESIZE.items():
        value = attributes.get(name, ONNX_RESIZE_DEFAULTS[name])
        value = value.decode() if isinstance(value, bytes) else value
        if value not in allowed:
            problems.append(f"Resize {node.name} {name}={value}")
    return problems


def tensorrt_problems(path):
    """What in the ONNX file at `path` TensorRT 8.6's parser does not take, per its support matrix:
    operators, Resize modes, data types, an opset above 17. Empty: every node is supported."""
    onnx = optional_import("onnx")
    proto = onnx.shape_inference.infer_shapes(onnx.load(path))
    opset = next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))
    problems = [f"opset {opset} > {TENSORRT_8_6_OPSET}"] if opset > TENSORRT_8_6_OPSET else []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_8_6_OPS:
            problems.append(f"operator {node.domain or 'ai.onnx'}.{node.op_type} ({node.name})")
        elif node.op_type == "Resize":
            problems += resize_problems(node)
    graph = proto.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types |= {t.name: t.data_type for t in graph.initializer}
    for name, elem_type in types.items():
        type_name = onnx.TensorProto.DataType.Name(elem_type)
        if elem_type and type_name not in TENSORRT_8_6_TYPES:
            problems.append(f"tensor {name} of type {type_name}")
    return problems


def export_onnx(model, out, *, size, dynamic, argmax, opset, simplify, metadata):
    try:
        graph = export(
            model,
            out,
            size=size,
            dynamic=dynamic,
            argmax=argmax,
            opset=opset,
            simplify=simplify,
            metadata=metadata,
        )
        opset_written = written_opset(out)
    except ImportError as e:
        raise cli.UsageError(
            f"ONNX export needs the optional extras ({e}); pip install onnx onnxscript onnxruntime"
        ) from None
    if opset_written != opset:
        raise cli.UsageError(
            f"asked for opset {opset}, but the exporter wrote opset {opset_written} to {out}; "
            f"pass --opset {opset_written}"
        )
    sizes = [size, second_size(size)] if dynamic else [size]
    parity = check_parity(graph, out, sizes=sizes)
    if parity:
        shown = " and ".join(f"{h}x{w}" for h, w in sizes)
        print(
            f"onnxruntime vs PyTorch at {shown}: "
            + ", ".join(f"{k} {v:.6g}" for k, v in parity.items())
        )
    result = {"onnx": str(out), "opset": opset_written, "dynamic": dynamic, "argmax": argmax}
    result |= {"simplified": simplify, **(parity or {})}
    if opset_written <= TENSORRT_8_6_OPSET:
        problems = tensorrt_problems(out)
        result["tensorrt_8.6_unsupported"] = problems
        if problems:
            print(
                f"warning: TensorRT 8.6 cannot parse {out}: {'; '.join(problems)}", file=sys.stderr
            )
        else:
            print(f"TensorRT 8.6: every node of {out} is in its ONNX operator support matrix")
    return result


# -- OpenVINO --------------------------------------------------------------------------------------
def calibration_images(root, dataset_type, *, count, size, num_classes):
    """`count` training images spread evenly over the split, resized to `size` (bilinear): float32
    1x3xHxW arrays."""
    dataset = open_dataset(root, "train", dataset_type=dataset_type, with_labels=False)
    if len(dataset) == 0:
        raise DataError(
            f"--calib-data {root}: its train split has no images to calibrate int8 on; "
            "pass the data root the model was trained on"
        )
    if dataset.info.num_classes != num_classes:
        raise cli.UsageError(
            f"--calib-data {root}: {dataset.info.name} has {dataset.info.num_classes} classes, "
            f"the model {num_classes}; calibrate on its own data"
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
    """NNCF post-training quantisation (weights and activations int8), calibrated on `images`
    (float32 1x3xHxW arrays of real training images)."""
    nncf = optional_import("nncf")
    return nncf.quantize(ov_model, nncf.Dataset(images), subset_size=len(images))


def save_openvino(ov_model, out, *, metadata):
    """xml + bin written under temporary names, then published without replacing anything: the bin
    first and the xml, what a reader opens, last, so that no reader ever sees a half-written or
    mismatched pair."""
    ov = optional_import("openvino")
    out = Path(out)
    ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    with atomic_write(out, replace=False, suffix=".tmp.xml") as temp:
        try:
            try:
                ov.save_model(ov_model, temp, compress_to_fp16=False)
            except (
                RuntimeError
            ) as e:  # OpenVINO's C++ stream errors ("basic_ios::clear") say nothing
                free = shutil.disk_usage(out.parent).free // 2**20
                raise cli.UsageError(
                    f"{out}: OpenVINO could not write the model ({cli.first_line(e)}); "
                    f"{free} MB are free in {out.parent.resolve()}"
                ) from None
            publish_new(temp.with_suffix(".bin"), out.with_suffix(".bin"))
        finally:
            temp.with_suffix(".bin").unlink(missing_ok=True)


def check_openvino(graph, float_model, *, written, metadata, image):
    """The float graph run in f32 against PyTorch (logits), and what was written, at OpenVINO's
    default precision (and int8 if quantised), against PyTorch fp32 (class map)."""
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
    """fp32 IR, or int8 when calibration images are given. The parity image is the first calibration
    image (a real one), else random."""
    started = time.perf_counter()
    float_model = to_openvino(model)
    converted_s = time.perf_counter() - started
    written = quantize_int8(float_model.clone(), calibration) if calibration else float_model
    if calibration and not any(op.get_type_name() == "FakeQuantize" for op in written.get_ops()):
        raise cli.UsageError(
            "--int8: NNCF quantised no layer of the model, so the IR would be fp32; "
            "nothing was written"
        )
    quantized_s = time.perf_counter() - started - converted_s
    save_openvino(written, out, metadata=metadata)
    image = torch.from_numpy(calibration[0]) if calibration else random_images(size)
    parity = check_openvino(
        DeployGraph(model), float_model, written=written, metadata=metadata, image=image
    )
    source = "a training image" if calibration else "a random image"
    print(
        f"OpenVINO vs PyTorch at {size[0]}x{size[1]} ({source}): f32 logits max |diff| "
        f"{parity['max_abs_logit_diff_f32']:.3g}; class map of {parity['runtime_precision']}: "
        f"{100 * parity['class_agreement']:.2f}% agree with fp32"
    )
    timing = {"convert_s": round(converted_s, 2)}
    if calibration:
        timing |= {"quantize_s": round(quantized_s, 2), "calib_images": len(calibration)}
    return {
        "openvino": str(out),
        "bin": str(Path(out).with_suffix(".bin")),
        "precision": metadata["precision"],
        **timing,
        **parity,
    }


# -- ncnn ------------------------------------------------------------------------------------------
def pnnx_convert(graph, work, *, sizes):
    """The traced graph converted by pnnx in the folder `work`: (param, bin) of ncnn, fp32 weights.
    Tracing at two sizes tells pnnx that height and width are dynamic (ncnn's Interp then takes the
    input's size)."""
    pnnx = optional_import("pnnx")
    work = Path(work)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's note on the Python-level `size if upsample`
        torch.jit.trace(graph, random_images(sizes[0]), check_trace=False).save(work / "model.pt")
    shapes = [f"[1,3,{h},{w}]f32" for h, w in sizes]
    command = [pnnx.EXEC_PATH, "model.pt", f"inputshape={shapes[0]}", f"inputshape2={shapes[1]}"]
    command += ["fp16=0", "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin", "device=cpu"]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True)
    param, weights = work / "model.ncnn.param", work / "model.ncnn.bin"
    if result.returncode != 0 or not (param.is_file() and weights.is_file()):
        said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise cli.UsageError(
            f"pnnx could not convert the model to ncnn (exit {result.returncode}: {said[:300]}); "
            "pip install --upgrade pnnx ncnn"
        )
    return param, weights


def check_ncnn(graph, param, metadata, *, sizes):
    """ncnn (fp32) against PyTorch on one random image per size: the worst logit difference and
    argmax agreement."""
    deployed = NcnnModel(param, metadata)
    diffs, agreements = [], []
    for size in sizes:
        images = random_images(size)
        with torch.no_grad():
            expected = graph(images)
        got = torch.from_numpy(deployed.logits(images))
        diffs.append((got - expected).abs().max().item())
        agreements.append((got.argmax(1) == expected.argmax(1)).float().mean().item())
    return {"max_abs_logit_diff": max(diffs), "argmax_agreement": min(agreements)}


def export_ncnn(model, out, *, size, metadata):
    """NAME.param, NAME.bin and NAME.json (the metadata, which ncnn's files have no place for),
    published without replacing anything: the bin and json first, the param, what a reader opens,
    last."""
    graph = fuse_bn(model.eval())
    sizes = [size, second_size(size)]
    files = ncnn_files(out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bisenet_pnnx_") as work:
        param, weights = pnnx_convert(graph, work, sizes=sizes)
        converted_s = time.perf_counter() - started
        with (
            atomic_write(files["param"], replace=False, suffix=".tmp.param") as temp_param,
            atomic_write(files["json"], replace=False, suffix=".tmp.json") as temp_json,
            atomic_write(files["bin"], replace=False, suffix=".tmp.bin") as temp_bin,
        ):
            shutil.copyfile(param, temp_param)
            shutil.copyfile(weights, temp_bin)
            temp_json.write_text(json.dumps(metadata))
    parity = check_ncnn(graph, files["param"], metadata, sizes=sizes)
    shown = " and ".join(f"{h}x{w}" for h, w in sizes)
    print(
        f"ncnn vs PyTorch at {shown}: max |logit diff| {parity['max_abs_logit_diff']:.3g}, "
        f"argmax agreement {parity['argmax_agreement']:.6g}"
    )
    return {
        "ncnn": str(files["param"]),
        "bin": str(files["bin"]),
        "metadata": str(files["json"]),
        "precision": "fp32",
        "convert_s": round(converted_s, 2),
        **parity,
    }


# -- The script ------------------------------------------------------------------------------------
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "ncnn": ".param"}


def written_files(out, fmt):
    if fmt == "openvino":
        return [out, out.with_suffix(".bin")]
    return list(ncnn_files(out).values()) if fmt == "ncnn" else [out]


def add_onnx_flags(parser):
    group = parser.add_argument_group("ONNX")
    group.add_argument(
        "--dynamic",
        action="store_true",
        help="height and width as dynamic axes (OpenVINO's and ncnn's always are)",
    )
    group.add_argument(
        "--argmax", action="store_true", help="output the class map instead of logits"
    )
    group.add_argument(
        "--opset",
        type=cli.integer(11),
        help=f"ONNX opset (default {DYNAMO_MIN_OPSET}): {DYNAMO_MIN_OPSET} or newer through "
        "torch's torch.export-based exporter, "
        f"{TENSORRT_8_6_OPSET} or older (TensorRT 8.x, Jetson) through its TorchScript exporter, "
        "checked against TensorRT 8.6's operator support",
    )
    group.add_argument(
        "--simplify", action="store_true", help="fold constants and shape arithmetic with onnxslim"
    )


def add_openvino_flags(parser):
    group = parser.add_argument_group("OpenVINO")
    group.add_argument(
        "--int8", action="store_true", help="quantise to int8 with NNCF (needs --calib-data)"
    )
    group.add_argument(
        "--calib-data",
        help="data root whose training images calibrate --int8 (the model's own dataset)",
    )
    group.add_argument(
        "--calib-images",
        type=cli.integer(1, 300),
        default=8,
        help="calibration images (their time: PERFORMANCE.md)",
    )
    group.add_argument(
        "--dataset", default="auto", choices=cli.DATASET_TYPES, help="layout of --calib-data"
    )


def check_out(parser, args):
    args.out = Path(args.out or f"bisenetv1{SUFFIXES[args.format]}")
    out, suffix = args.out, SUFFIXES[args.format]
    if out.suffix != suffix:
        parser.error(
            f"argument --out: {out} does not end in {suffix}, which --format {args.format} writes"
        )
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        why = "a folder" if out.is_dir() else "its folder is missing or read-only"
        parser.error(f"argument --out: cannot write {out} ({why}); pass a writable file path")
    for path in written_files(out, args.format):
        if path.exists():
            parser.error(
                f"argument --out: {path} exists; pass another --out or remove it "
                "(an exported model is never overwritten)"
            )


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--format", default="onnx", choices=tuple(SUFFIXES))
    parser.add_argument(
        "--out",
        help="default: bisenetv1.onnx, bisenetv1.xml (+ .bin) with --format openvino, "
        "bisenetv1.param (+ .bin, .json) with --format ncnn",
    )
    parser.add_argument(
        "--size",
        type=cli.size,
        default="1024x2048",
        help="HxW recorded as the input size, of calibration and of the parity check",
    )
    add_onnx_flags(parser)
    add_openvino_flags(parser)
    args = parser.parse_args(argv)
    check_out(parser, args)
    if not all(32 <= side <= 8192 for side in args.size):
        parser.error(
            f"argument --size: {args.size[0]}x{args.size[1]}: each side must be 32 to 8192 pixels"
        )
    if args.int8 and args.format != "openvino":
        parser.error("argument --int8: int8 export is OpenVINO's; add --format openvino")
    if args.int8 != bool(args.calib_data):
        parser.error(
            "--int8 and --calib-data go together: int8 is calibrated on real training images, "
            "never on random ones"
        )
    onnx_only = [f for f in ("dynamic", "argmax", "simplify", "opset") if getattr(args, f)]
    if args.format != "onnx" and onnx_only:
        parser.error(
            f"--{onnx_only[0]} is an ONNX option: the {args.format} model always takes any size "
            "and returns what deploy.py reads; drop it"
        )
    args.opset = args.opset or DYNAMO_MIN_OPSET
    return args


def export_model(args, model, info, metadata):
    if args.format == "onnx":
        return export_onnx(
            model,
            args.out,
            size=args.size,
            dynamic=args.dynamic,
            argmax=args.argmax,
            opset=args.opset,
            simplify=args.simplify,
            metadata=metadata,
        )
    if args.format == "ncnn":
        return export_ncnn(model, args.out, size=args.size, metadata=metadata)
    calibration = None
    if args.int8:
        calibration = calibration_images(
            args.calib_data,
            args.dataset,
            count=args.calib_images,
            size=args.size,
            num_classes=info.num_classes,
        )
    return export_openvino(
        model, args.out, size=args.size, metadata=metadata, calibration=calibration
    )


def export_checkpoint(args):
    model, info = load_model(args.ckpt)
    metadata = export_metadata(
        model, info, size=args.size, precision="int8" if args.int8 else "fp32", source=args.ckpt
    )
    try:
        result = export_model(args, model, info, metadata)
    except FileExistsError:
        raise cli.UsageError(
            f"{args.out} appeared while the model was exported; it was kept, not replaced: "
            "pass another --out"
        ) from None
    except OSError as e:
        raise cli.UsageError(
            f"{args.out}: could not write the exported model ({e.strerror or e}); "
            "nothing was left behind"
        ) from None
    print(f"{args.out}: {info.num_classes} classes of {info.name}: {', '.join(info.class_names)}")
    size = f"{args.size[0]}x{args.size[1]}"
    print(
        json.dumps(
            {**result, "size": size, "dataset": info.name, "classes": list(info.class_names)}
        )
    )


def main(argv=None):
    cli.main(lambda: export_checkpoint(parse_args(argv)))


if __name__ == "__main__":
    main()
