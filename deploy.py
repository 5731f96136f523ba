"""Deployed models: the OpenVINO IR (.xml + .bin) and ONNX files that export.py writes, run on the CPU the way
evaluate.py runs a checkpoint (RGB images 0..255 in, the class map at input size out).

Every exported file describes itself (METADATA_KEY): the model configuration, the dataset's classes and palette,
the input size it was exported for, its precision and the checkpoint it came from; so `evaluate.py --model` needs
nothing else. OpenVINO, NNCF and ONNX Runtime are optional: each is imported only when a command asks for it.
"""

import copy
import importlib
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
from bisenet import ModelConfig, fuse_bn
from datasets import DatasetInfo

METADATA_KEY = "bisenet"
INSTALL = {"openvino": "pip install openvino nncf", "nncf": "pip install openvino nncf", "onnxruntime": "pip install onnxruntime"}
TRACE_SIZE = (64, 128)  # OpenVINO's graph has dynamic height and width, so tracing on a small image is enough (and fast)


def openvino_installed():
    return importlib.util.find_spec("openvino") is not None


def optional_import(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise cli.UsageError(f"this needs {name}, which is not installed ({e}); {INSTALL[name]}") from None


class DeployGraph(torch.nn.Module):
    """The exported computation: BatchNorm folded, normalisation inside, the class map at input size (uint8) and the
    logits at 1/8 size (cheap to return; they are what the fp32 parity check compares)."""

    def __init__(self, model):
        super().__init__()
        self.model = fuse_bn(copy.deepcopy(model).eval())

    def forward(self, images):
        logits = self.model(images, upsample=False)
        full = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        return full.argmax(1).to(torch.uint8), logits


# -- OpenVINO ---------------------------------------------------------------------------------------------------
def to_openvino(model):
    """An in-memory OpenVINO model of DeployGraph, any batch, height and width."""
    ov = optional_import("openvino")
    sample = torch.randint(0, 256, (1, 3, *TRACE_SIZE)).float()
    with torch.no_grad():
        ov_model = ov.convert_model(DeployGraph(model), example_input=sample, input=[ov.PartialShape([-1, 3, -1, -1])])
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"classes"})
    ov_model.outputs[1].get_tensor().set_names({"logits"})
    return ov_model


class OpenVinoModel:
    """An OpenVINO model compiled for the CPU, once per input shape. precision: "f32", or None for OpenVINO's
    default (bf16 where the CPU has it, else f32); int8 layers of a quantised model stay int8 either way."""

    def __init__(self, ov_model, metadata, *, precision=None):
        ov = optional_import("openvino")
        self.core, self.ov_model, self.metadata = ov.Core(), ov_model, metadata
        self.properties = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        self.compiled = {}

    def compile(self, shape):
        if shape not in self.compiled:
            model = self.ov_model.clone()  # the model itself keeps its dynamic shape
            model.reshape({"images": list(shape)})
            try:
                self.compiled[shape] = self.core.compile_model(model, "CPU", self.properties)
            except RuntimeError as e:  # OpenVINO's message is a stack of "Exception from <file>" lines; the last line says what failed
                reason = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("Exception from")]
                limit = (
                    " (ONEDNN_MAX_CPU_ISA is set: OpenVINO's CPU plugin does not run under every limit; unset it)"
                    if os.environ.get("ONEDNN_MAX_CPU_ISA")
                    else ""
                )
                raise cli.UsageError(f"OpenVINO cannot compile the model for this CPU: {reason[-1] if reason else type(e).__name__}{limit}") from None
        return self.compiled[shape]

    @property
    def precision(self):
        runtime = self.properties.get("INFERENCE_PRECISION_HINT") or self.core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
        return f"OpenVINO {'int8 + ' + runtime if self.metadata['precision'] == 'int8' else runtime}"

    def run(self, images):
        """(class map, logits at 1/8 size) as numpy arrays."""
        result = self.compile(tuple(images.shape))(images.float().cpu().numpy())
        return result["classes"], result["logits"]

    def __call__(self, images):
        return torch.from_numpy(self.run(images)[0]).long()


# -- ONNX Runtime -----------------------------------------------------------------------------------------------
class OnnxModel:
    """An ONNX file of export.py (logits or, with --argmax, the class map), run by ONNX Runtime on the CPU in fp32."""

    precision = "ONNX Runtime fp32"

    def __init__(self, path, metadata):
        ort = optional_import("onnxruntime")
        self.path, self.metadata = path, metadata
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]

    def __call__(self, images):
        static = self.input.shape[2:]
        if all(isinstance(d, int) for d in static) and tuple(static) != tuple(images.shape[2:]):
            h, w = images.shape[2:]
            raise cli.UsageError(f"{self.path} was exported for {static[0]}x{static[1]} images, this one is {h}x{w}; export with --dynamic or --size {h}x{w}")
        output = torch.from_numpy(self.session.run(None, {self.input.name: images.float().cpu().numpy()})[0])
        return output.long() if output.dtype == torch.uint8 else output.max(1).indices


def read_metadata(path):
    if path.suffix == ".xml":
        ov_model = optional_import("openvino").Core().read_model(path)
        text = ov_model.get_rt_info([METADATA_KEY]).astype(str) if ov_model.has_rt_info([METADATA_KEY]) else None
        return ov_model, json.loads(text) if text else None
    onnx = optional_import("onnx")
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return None, json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None


def open_deployed(path, precision=None):
    """--model PATH.xml or PATH.onnx. precision: OpenVINO's hint, "f32" or None for its own choice (bf16 where the
    CPU has it); Runtime.openvino_precision decides."""
    path = Path(path)
    if path.suffix not in (".xml", ".onnx"):
        raise cli.UsageError(f"--model {path}: expected an OpenVINO .xml or an .onnx file written by export.py")
    if not path.is_file():
        raise cli.UsageError(f"--model {path}: no such file")
    if path.stat().st_size == 0:
        raise cli.UsageError(f"--model {path}: the file is empty (an interrupted copy or export?); export it again with python export.py")
    try:
        ov_model, metadata = read_metadata(path)
    except cli.UsageError:  # the runtime is not installed: its own message says what to install
        raise
    except Exception as e:  # noqa: BLE001  (each parser has its own errors: protobuf's DecodeError, OpenVINO's RuntimeError, ...)
        raise cli.UsageError(f"--model {path}: not a readable {path.suffix} model ({cli.first_line(e)}); export it again with python export.py") from None
    if metadata is None:
        raise cli.UsageError(f"--model {path}: it does not describe its classes (not written by this export.py); export it again with python export.py")
    if ov_model is not None:
        return OpenVinoModel(ov_model, metadata, precision=precision)
    return OnnxModel(path, metadata)


def deployed_info(deployed):
    return DatasetInfo.from_dict(deployed.metadata["dataset"])


def deployed_config(deployed):
    return ModelConfig.from_dict(deployed.metadata["model_config"], "the exported model")
