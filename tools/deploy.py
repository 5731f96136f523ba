"""Deployed models: the OpenVINO IR (.xml + .bin), ONNX and ncnn (.param + .bin + .json) files that
tools/export.py writes, run on the CPU the way evaluate.py runs a checkpoint (RGB images 0..255 in,
the class map at input size out), and live video.

    python tools/deploy.py --model r18_int8.xml --data-root data/cityscapes  # val mIoU
    python tools/deploy.py --model r18.param --data-root data/cityscapes     # the same through ncnn
    python tools/deploy.py --model r18_int8.xml --images photos/ --out-dir out
    python tools/deploy.py --model r18_int8.xml --video drive.mp4 --out seg.mp4  # or a camera: 0
    python tools/deploy.py --ckpt model.pth --video drive.mp4  # through OpenVINO when installed

Every exported model describes itself (METADATA_KEY; ncnn's in NAME.json beside NAME.param): the
model configuration, the dataset's classes and palette, the input size it was exported for, its
precision and the checkpoint it came from; so `--model` needs nothing else. It takes evaluate.py's
flags, with one whole-image pass. Each runtime uses as many threads as PyTorch does here
(OMP_NUM_THREADS, else the cores). OpenVINO, NNCF, ONNX Runtime and ncnn are optional: each is
imported only when a command asks for it.
"""

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from bisenet import ModelConfig, fuse_bn
from checkpoints import load_model
from datasets import DatasetInfo
from device import setup_runtime, teardown_runtime
from evaluate import (
    Inference,
    check_flags,
    evaluation_parser,
    inference_model,
    score,
    torch_segmenter,
)
from video import CODECS, default_output, segment_video

METADATA_KEY = "bisenet"
INSTALL = {
    "openvino": "pip install openvino nncf",
    "nncf": "pip install openvino nncf",
    "onnxruntime": "pip install onnxruntime",
    "onnx": "pip install onnx onnxscript onnxruntime",
    "onnxslim": "pip install onnxslim",
    "ncnn": "pip install ncnn",
    "pnnx": "pip install pnnx ncnn",
}
# OpenVINO's graph has dynamic height and width, so tracing on a small image is enough (and fast)
TRACE_SIZE = (64, 128)
SUFFIXES = (".xml", ".onnx", ".param")


def openvino_installed():
    return importlib.util.find_spec("openvino") is not None


def threads():
    """The threads every runtime gets: PyTorch's (OMP_NUM_THREADS, else the cores), so that runtimes
    timed side by side compute on the same cores."""
    return torch.get_num_threads()


def optional_import(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise cli.UsageError(
            f"this needs {name}, which is not installed ({e}); {INSTALL[name]}"
        ) from None


class DeployGraph(torch.nn.Module):
    """The exported computation: BatchNorm folded, normalisation inside, the class map at input size
    (uint8) and the logits at 1/8 size (cheap to return; they are what the fp32 parity check
    compares)."""

    def __init__(self, model):
        super().__init__()
        self.model = fuse_bn(model)

    def forward(self, images):
        logits = self.model(images, upsample=False)
        full = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        return full.argmax(1).to(torch.uint8), logits


# -- OpenVINO --------------------------------------------------------------------------------------
def to_openvino(model):
    """An in-memory OpenVINO model of DeployGraph, any batch, height and width."""
    ov = optional_import("openvino")
    sample = torch.randint(0, 256, (1, 3, *TRACE_SIZE)).float()
    with torch.no_grad():
        ov_model = ov.convert_model(
            DeployGraph(model), example_input=sample, input=[ov.PartialShape([-1, 3, -1, -1])]
        )
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"classes"})
    ov_model.outputs[1].get_tensor().set_names({"logits"})
    return ov_model


class OpenVinoModel:
    """An OpenVINO model compiled for the CPU, once per input shape. precision: "f32", or None for
    OpenVINO's default (bf16 where the CPU has it, else f32); int8 layers of a quantised model stay
    int8 either way."""

    def __init__(self, ov_model, metadata, *, precision=None):
        ov = optional_import("openvino")
        self.core, self.ov_model, self.metadata = ov.Core(), ov_model, metadata
        self.properties = {"INFERENCE_NUM_THREADS": threads()}
        self.properties |= {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        self.compiled = {}

    def compile(self, shape):
        if shape not in self.compiled:
            model = self.ov_model.clone()  # the model itself keeps its dynamic shape
            model.reshape({"images": list(shape)})
            try:
                self.compiled[shape] = self.core.compile_model(model, "CPU", self.properties)
            except RuntimeError as e:
                limit = (
                    " (ONEDNN_MAX_CPU_ISA is set: OpenVINO's CPU plugin does not run under every "
                    "limit; unset it)"
                    if os.environ.get("ONEDNN_MAX_CPU_ISA")
                    else ""
                )
                raise cli.UsageError(
                    f"OpenVINO cannot compile the model for this CPU: {cli.first_line(e)}{limit}"
                ) from None
        return self.compiled[shape]

    @property
    def precision(self):
        runtime = (
            self.properties.get("INFERENCE_PRECISION_HINT")
            or self.core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
        )
        quantised = self.metadata["precision"] == "int8"
        return f"OpenVINO {'int8 + ' + runtime if quantised else runtime}"

    def run(self, images):
        """(class map, logits at 1/8 size) as numpy arrays."""
        result = self.compile(tuple(images.shape))(images.float().cpu().numpy())
        return result["classes"], result["logits"]

    def __call__(self, images):
        return torch.from_numpy(self.run(images)[0]).long()


# -- ONNX Runtime ----------------------------------------------------------------------------------
class OnnxModel:
    """An ONNX file of export.py (logits or, with --argmax, the class map), run by ONNX Runtime on
    the CPU in fp32."""

    precision = "ONNX Runtime fp32"

    def __init__(self, path, metadata):
        ort = optional_import("onnxruntime")
        self.path, self.metadata = path, metadata
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001  (ONNX Runtime's own kinds: external data missing, ...)
            raise cli.UsageError(
                f"--model {path}: ONNX Runtime cannot load it ({cli.first_line(e)}); "
                "export it again with python tools/export.py"
            ) from None
        self.input = self.session.get_inputs()[0]

    def __call__(self, images):
        static = self.input.shape[2:]
        if all(isinstance(d, int) for d in static) and tuple(static) != tuple(images.shape[2:]):
            h, w = images.shape[2:]
            raise cli.UsageError(
                f"{self.path} was exported for {static[0]}x{static[1]} images, "
                f"this one is {h}x{w}; export with --dynamic or --size {h}x{w}"
            )
        output = torch.from_numpy(
            self.session.run(None, {self.input.name: images.float().cpu().numpy()})[0]
        )
        return output.long() if output.ndim == 3 else output.max(1).indices  # --argmax: NxHxW


# -- ncnn ------------------------------------------------------------------------------------------
def ncnn_files(param):
    """The three files of an ncnn export: the graph, its weights, and the metadata (which ncnn has
    no place for)."""
    param = Path(param)
    return {"param": param, "bin": param.with_suffix(".bin"), "json": param.with_suffix(".json")}


class NcnnModel:
    """An ncnn model of export.py (pnnx's NAME.param + NAME.bin: logits of one CxHxW image, any
    height and width), run on the CPU in fp32, one image of the batch at a time."""

    precision = "ncnn fp32"

    def __init__(self, path, metadata):
        ncnn = optional_import("ncnn")
        self.ncnn, self.path, self.metadata = ncnn, Path(path), metadata
        self.net = ncnn.Net()
        self.net.opt.num_threads = threads()
        # fp32 throughout: ncnn's own default stores and computes in fp16 where the CPU can (ARM)
        for option in ("fp16_storage", "fp16_packed", "fp16_arithmetic", "bf16_storage"):
            setattr(self.net.opt, f"use_{option}", False)
        weights = ncnn_files(path)["bin"]
        if not weights.is_file():
            raise cli.UsageError(
                f"--model {path}: its weights {weights} are missing; copy them beside it, "
                "or export it again with python tools/export.py"
            )
        if self.net.load_param(str(path)) != 0 or self.net.load_model(str(weights)) != 0:
            raise cli.UsageError(
                f"--model {path}: ncnn cannot load it or its {weights.name}; "
                "export it again with python tools/export.py"
            )
        self.input, self.output = self.net.input_names()[0], self.net.output_names()[0]

    def logits(self, images):
        """NxCxHxW logits at input size, as a numpy array."""
        out = []
        for image in images.float().cpu().numpy():
            extractor = self.net.create_extractor()
            # clone: ncnn's Mat of a numpy array borrows its memory, which must outlive extract()
            extractor.input(self.input, self.ncnn.Mat(np.ascontiguousarray(image)).clone())
            code, logits = extractor.extract(self.output)
            if code != 0:
                raise cli.UsageError(f"--model {self.path}: ncnn failed on an image (code {code})")
            out.append(np.array(logits))
        return np.stack(out)

    def __call__(self, images):
        return torch.from_numpy(self.logits(images)).max(1).indices


def read_metadata(path):
    """(the OpenVINO model or None, the metadata or None) of an exported file."""
    if path.suffix == ".xml":
        ov_model = optional_import("openvino").Core().read_model(path)
        text = (
            ov_model.get_rt_info([METADATA_KEY]).astype(str)
            if ov_model.has_rt_info([METADATA_KEY])
            else None
        )
        return ov_model, json.loads(text) if text else None
    if path.suffix == ".param":
        description = ncnn_files(path)["json"]
        return None, json.loads(description.read_text()) if description.is_file() else None
    onnx = optional_import("onnx")
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return None, json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None


def openvino_precision(runtime, amp):
    """OpenVINO's INFERENCE_PRECISION_HINT for the same O1 as PyTorch's: "f32" where PyTorch runs
    fp32, else None (OpenVINO's own choice: bf16 where the CPU has it)."""
    return "f32" if runtime.precision(amp) == "fp32" else None


def open_deployed(path, precision=None):
    """--model PATH.xml, PATH.onnx or PATH.param. precision: OpenVINO's hint
    (openvino_precision)."""
    path = Path(path)
    again = "export it again with python tools/export.py"
    if path.suffix not in SUFFIXES:
        raise cli.UsageError(
            f"--model {path}: expected an OpenVINO .xml, an .onnx or an ncnn .param file "
            "written by export.py"
        )
    if not path.is_file():
        raise cli.UsageError(f"--model {path}: no such file")
    if path.stat().st_size == 0:
        raise cli.UsageError(
            f"--model {path}: the file is empty (an interrupted copy or export?); {again}"
        )
    try:
        ov_model, metadata = read_metadata(path)
    except cli.UsageError:  # the runtime is not installed: its own message says what to install
        raise
    except Exception as e:  # noqa: BLE001  (each parser has its own: protobuf's DecodeError, JSON's, ...)
        raise cli.UsageError(
            f"--model {path}: not a readable {path.suffix} model ({cli.first_line(e)}); {again}"
        ) from None
    if metadata is None:
        raise cli.UsageError(
            f"--model {path}: it does not describe its classes (not written by tools/export.py); "
            + again
        )
    if ov_model is not None:
        return OpenVinoModel(ov_model, metadata, precision=precision)
    return NcnnModel(path, metadata) if path.suffix == ".param" else OnnxModel(path, metadata)


# -- The script ------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = evaluation_parser(__doc__)
    group = parser.add_argument_group("exported model and video")
    group.add_argument(
        "--model",
        help="an OpenVINO .xml, ONNX .onnx or ncnn .param file of tools/export.py "
        "(runs on the CPU)",
    )
    group.add_argument(
        "--video", help="a video file or a camera index (0, 1, ...) to segment frame by frame"
    )
    group.add_argument(
        "--out",
        help="with --video: the overlay video to write, .mp4 or .avi "
        "(default: NAME_bisenet.mp4 here)",
    )
    args = check_flags(parser, parser.parse_args(argv))
    if not (args.model or args.video):
        parser.error(
            "pass --model (an exported model) or --video; "
            "a checkpoint alone is scored by python evaluate.py"
        )
    if args.ckpt and args.model:
        parser.error("pass --ckpt or --model, not both")
    if args.model and args.device not in ("auto", "cpu"):
        parser.error(
            "argument --model: an exported model runs on the CPU (OpenVINO, ONNX Runtime or ncnn); "
            f"drop --device {args.device}"
        )
    if args.out and not args.video:
        parser.error(
            "argument --out: it names the overlay video of --video; for images use --out-dir"
        )
    if args.video:
        args.out = Path(args.out) if args.out else default_output(args.video)
        if args.out.suffix not in CODECS:
            parser.error(f"argument --out: {args.out} must end in {' or '.join(CODECS)}")
        if args.out.exists():
            parser.error(
                f"argument --out: {args.out} exists; pass another --out or remove it "
                "(it is never overwritten)"
            )
        if not args.out.parent.is_dir():
            parser.error(f"argument --out: the folder of {args.out} does not exist")
        if args.images or args.out_dir:
            flag = "--images" if args.images else "--out-dir"
            parser.error(
                f"argument {flag}: not used with --video, which writes one video to --out; drop it"
            )
    return args


def open_model(ckpt, model_file, *, runtime, amp, options):
    """(segment, the DatasetInfo of its classes, precision) of --model, or of --ckpt for video: on a
    CPU through the fastest path there is (one whole-image pass: OpenVINO converted in memory, when
    it is installed)."""
    if model_file:
        if not options.single_pass:
            raise cli.UsageError(
                "--scales, --flip and --mode slide need --ckpt: "
                "an exported model runs one whole-image pass"
            )
        deployed = open_deployed(model_file, openvino_precision(runtime, amp))
        info, config = (
            DatasetInfo.from_dict(deployed.metadata["dataset"]),
            ModelConfig.from_dict(deployed.metadata["model_config"], "the exported model"),
        )
        if config.num_classes != info.num_classes:
            raise cli.UsageError(
                f"--model {model_file}: its metadata names {info.num_classes} classes "
                f"for a model of {config.num_classes}; export it again"
            )
        return deployed, info, deployed.precision
    if not ckpt:
        raise cli.UsageError("--video needs --model or --ckpt")
    model, info = load_model(ckpt)
    if options.single_pass and runtime.device.type == "cpu" and openvino_installed():
        deployed = OpenVinoModel(
            to_openvino(model), {"precision": "fp32"}, precision=openvino_precision(runtime, amp)
        )
        return deployed, info, f"{deployed.precision} (converted in memory)"
    return (
        torch_segmenter(inference_model(model, runtime), runtime, amp=amp, options=options),
        info,
        runtime.precision(amp),
    )


def run(args):
    runtime = setup_runtime(
        "cpu" if args.model else args.device, args.device_id, amp_dtype=args.amp_dtype
    )
    if not args.model:
        print(runtime.device_note, flush=True)
        print(runtime.precision_note(args.amp), flush=True)
    options = Inference.from_args(args)
    segment, info, precision = open_model(
        args.ckpt, args.model, runtime=runtime, amp=args.amp, options=options
    )
    if args.model:
        print(f"precision: {precision}", flush=True)
    if args.video:
        print(f"segmenting {args.video} with {precision} into {args.out}")
        print(
            json.dumps(
                {
                    **segment_video(
                        segment, args.video, out=args.out, info=info, device=runtime.device
                    ),
                    "precision": precision,
                }
            )
        )
    else:
        score(segment, info, args, runtime, precision=precision, model_name=args.model)
    teardown_runtime(runtime)


def main(argv=None):
    cli.main(run, parse_args(argv))


if __name__ == "__main__":
    main()
