"""Export a BiSeNetV1 checkpoint to ONNX (BatchNorm folded, normalisation inside the graph).

    python export.py --ckpt work_dirs/r18/latest.pth --out bisenetv1.onnx --size 1024x2048
    python export.py --ckpt model.pth --out bisenetv1.onnx --dynamic --argmax     # any H/W, uint8 class map out

The graph takes a float32 RGB image 1x3xHxW with values 0..255 and returns logits 1xCxHxW (or, with --argmax,
a 1xHxW class map). When onnxruntime is installed the export is checked against PyTorch and the figures printed.
"""

import json
import os
import sys
from pathlib import Path

import torch

import cli
from bisenet import CheckpointError, fuse_bn, load_model_and_dataset
from evaluate import checkpoint_dataset


class ArgmaxHead(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images).argmax(1).to(torch.uint8)


def export(model, out, size, dynamic=False, argmax=False, opset=18):
    """torch.export-based exporter (needs onnxscript); dynamic height/width keep BiSeNet's any-size resizing."""
    model = fuse_bn(model.eval())
    graph = ArgmaxHead(model).eval() if argmax else model
    sample = torch.randint(0, 256, (1, 3, *size)).float()
    shapes = {"images": {2: torch.export.Dim("height", min=32, max=8192), 3: torch.export.Dim("width", min=32, max=8192)}} if dynamic else None
    torch.onnx.export(
        graph, (sample,), out, input_names=["images"], output_names=["output"], dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False
    )
    return graph


def check_parity(graph, out, size):
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
    return {"max_abs_logit_diff": (got - expected).abs().max().item(), "argmax_agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item()}


def written_opset(out):
    import onnx

    return next(entry.version for entry in onnx.load(out, load_external_data=False).opset_import if entry.domain in ("", "ai.onnx"))


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default="bisenetv1.onnx")
    parser.add_argument("--size", type=cli.size, default="1024x2048", help="HxW of the traced input (and of the parity check)")
    parser.add_argument("--dynamic", action="store_true", help="height and width as dynamic axes")
    parser.add_argument("--argmax", action="store_true", help="output the uint8 class map instead of logits")
    parser.add_argument("--opset", type=cli.integer(18), default=18, help="ONNX opset; torch's exporter writes 18 or newer")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        parser.error(f"argument --out: cannot write {out} ({'a folder' if out.is_dir() else 'its folder is missing or read-only'}); pass a writable file path")
    try:
        model, description = load_model_and_dataset(args.ckpt)
        graph = export(model, out, args.size, args.dynamic, args.argmax, args.opset)
        opset = written_opset(out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        print(f"error: ONNX export needs the optional extras ({e}); pip install onnx onnxscript onnxruntime", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {out}: could not write the ONNX file ({e.strerror or e})", file=sys.stderr)
        sys.exit(2)
    if opset != args.opset:
        print(f"error: asked for opset {args.opset}, but the exporter wrote opset {opset} to {out}; pass --opset {opset}", file=sys.stderr)
        sys.exit(2)
    parity = check_parity(graph, out, args.size)
    if parity:
        print(f"onnxruntime vs PyTorch at {args.size[0]}x{args.size[1]}: " + ", ".join(f"{k} {v:.6g}" for k, v in parity.items()))
    info = checkpoint_dataset(description)
    print(f"{out}: {info.num_classes} classes of {info.name}: {', '.join(info.class_names)}")
    print(
        json.dumps(
            {
                "onnx": str(out),
                "opset": opset,
                "dynamic": args.dynamic,
                "argmax": args.argmax,
                "dataset": info.name,
                "classes": list(info.class_names),
                **(parity or {}),
            }
        )
    )


if __name__ == "__main__":
    main()
