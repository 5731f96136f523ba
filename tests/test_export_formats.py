"""The deployment formats for TensorRT and ncnn: ONNX at opset 17 (static and dynamic, simplified)
checked against TensorRT 8.6's operator support, and ncnn through pnnx; each scored by
tools/deploy.py with evaluate.py's metric against the checkpoint it came from, run at a size it was
not exported at against PyTorch, and timed against eager fp32 in one benchmark run. The optional
runtimes' one-line errors."""

import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import in_process, last_json, one_line_error, succeeded
from onnx import TensorProto, helper
from PIL import Image

import benchmark_inference
import deploy
import evaluate
from checkpoints import load_model
from export import TENSORRT_8_6_OPS, tensorrt_problems

ncnn = pytest.importorskip(
    "ncnn", reason="ncnn is optional here; CI installs it (pip install ncnn)"
)
pytest.importorskip("pnnx", reason="pnnx is optional here; CI installs it (pip install pnnx)")
onnxruntime = pytest.importorskip("onnxruntime", reason="pip install onnxruntime")


@pytest.fixture(scope="module")
def trained(learned):
    """conftest's learned R18 (150 iterations on its own synthetic Cityscapes) and its data root."""
    return learned[1] / "latest.pth", learned[0]


@pytest.fixture(scope="module")
def formats(trained, tmp_path_factory):
    """The checkpoint exported at opset 17 (static; dynamic and simplified) and to ncnn, with the
    export summaries."""
    ckpt, _ = trained
    folder = tmp_path_factory.mktemp("formats")
    common = ["--ckpt", ckpt, "--size", "128x256"]
    runs = {
        "static": ["--out", folder / "static.onnx", "--opset", "17"],
        "dynamic": ["--out", folder / "dynamic.onnx", "--opset", "17", "--dynamic", "--simplify"],
        "ncnn": ["--format", "ncnn", "--out", folder / "r18.param"],
    }
    summaries = {
        name: last_json(succeeded("tools/export.py", *common, *a)) for name, a in runs.items()
    }
    files = {"static": "static.onnx", "dynamic": "dynamic.onnx", "ncnn": "r18.param"}
    return folder, {name: folder / f for name, f in files.items()}, summaries


def scored(capsys, root, out_dir, main, *model):
    argv = [*model, "--data-root", root, "--workers", "0", "--out-dir", out_dir]
    main([str(a) for a in [*argv, "--format", "trainIds"]])
    return last_json(capsys.readouterr().out)


def class_maps(folder):
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))])


@pytest.mark.slow
def test_exports_are_opset_17_tensorrt_parsable_and_equal_pytorch(formats):
    folder, paths, summaries = formats
    for name in ("static", "dynamic"):
        proto = onnx.load(paths[name])
        opsets = {e.domain: e.version for e in proto.opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) == 17, opsets
        assert {n.op_type for n in proto.graph.node} <= TENSORRT_8_6_OPS
        assert summaries[name]["tensorrt_8.6_unsupported"] == []
        assert summaries[name]["max_abs_logit_diff"] < 1e-3 and summaries[name]["opset"] == 17
    inputs = {
        n: onnx.load(paths[n]).graph.input[0].type.tensor_type.shape.dim
        for n in paths
        if n != "ncnn"
    }
    assert [d.dim_value for d in inputs["static"]] == [1, 3, 128, 256]
    assert [d.dim_param or d.dim_value for d in inputs["dynamic"]][2:] == ["height", "width"]
    assert summaries["dynamic"]["simplified"] and summaries["ncnn"]["max_abs_logit_diff"] < 1e-3
    assert sorted(p.name for p in folder.iterdir()) == [
        "dynamic.onnx",
        "r18.bin",
        "r18.json",
        "r18.param",
        "static.onnx",
    ]  # no temp files, nothing of pnnx's


@pytest.mark.slow
def test_dynamic_onnx_and_ncnn_take_other_sizes_like_pytorch(formats, trained):
    """At a size neither was exported at, against the checkpoint in PyTorch (fp32, BatchNorm
    unfused)."""
    _, paths, _ = formats
    model = load_model(trained[0])[0].eval()
    torch.manual_seed(3)
    images = torch.randint(0, 256, (1, 3, 96, 200)).float()
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(
        str(paths["dynamic"]), providers=["CPUExecutionProvider"]
    )
    onnx_logits = session.run(None, {"images": images.numpy()})[0]
    net = ncnn.Net()
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_arithmetic = False
    assert net.load_param(str(paths["ncnn"])) == 0
    assert net.load_model(str(paths["ncnn"].with_suffix(".bin"))) == 0
    extractor = net.create_extractor()
    extractor.input("in0", ncnn.Mat(images[0].numpy()).clone())  # a Mat borrows numpy's memory
    ncnn_logits = np.array(extractor.extract("out0")[1])[None]
    for got in (onnx_logits, ncnn_logits):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-3
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999


@pytest.mark.slow
def test_each_format_scores_like_the_checkpoint(formats, trained, tmp_path, capsys):
    """evaluate.py fp32 on the checkpoint and deploy.py on each export: the same val images, the
    same metric; within 0.5 mIoU (the issue's bar), and class maps that agree pixel for pixel but
    for ties."""
    ckpt, root = trained
    _, paths, _ = formats
    reference = scored(
        capsys, root, tmp_path / "ckpt", evaluate.main, "--ckpt", ckpt, "--amp", "O0"
    )
    assert reference["mIoU"] > 25, reference  # trained: real class maps to agree with
    precisions = {
        "static": "ONNX Runtime fp32",
        "dynamic": "ONNX Runtime fp32",
        "ncnn": "ncnn fp32",
    }
    for name, path in paths.items():
        result = scored(capsys, root, tmp_path / name, deploy.main, "--model", path)
        assert result["precision"] == precisions[name]
        assert result["images"] == reference["images"] == 6
        assert abs(result["mIoU"] - reference["mIoU"]) < 0.5, (name, result, reference)
        agreement = (class_maps(tmp_path / name) == class_maps(tmp_path / "ckpt")).mean()
        assert agreement > 0.9999, (name, agreement)


@pytest.mark.slow
def test_one_benchmark_run_times_onnx_and_ncnn_against_eager(formats, trained, capsys):
    _, paths, _ = formats
    argv = ["--model", paths["dynamic"], paths["ncnn"], "--size", "64x128"]
    benchmark_inference.main([str(a) for a in [*argv, "--runs", "2", "--warmup", "1"]])
    result = last_json(capsys.readouterr().out)
    runs = result["models"]
    assert [r["precision"] for r in runs] == ["ONNX Runtime fp32", "ncnn fp32"]
    assert all(r["baseline"] == f"eager fp32 of {trained[0]}" and r["speedup"] > 0 for r in runs)
    assert all(r["size"] == "64x128" and r["threads"] == torch.get_num_threads() for r in runs)
    fastest = min(runs, key=lambda r: r["latency_ms_median"])
    assert result["fastest"] == fastest["model"]


def tensor(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def test_tensorrt_check_names_what_tensorrt_8_6_cannot_parse(tmp_path):
    """A graph built by hand: an operator the matrix marks N (Unique), a cubic Resize, a uint8
    tensor and opset 18, each named; a graph of supported nodes passes."""
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="unique"),
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic", name="resize"),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.UINT8, name="cast"),
    ]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [tensor("y", TensorProto.UINT8, [1, 1, 8, 8]), tensor("u", TensorProto.FLOAT, None)],
        [scales],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "a.onnx"
    )
    problems = tensorrt_problems(tmp_path / "a.onnx")
    assert problems[0] == "opset 18 > 17"
    assert "operator ai.onnx.Unique (unique)" in problems
    assert "Resize resize mode=cubic" in problems
    assert "tensor y of type UINT8" in problems and len(problems) == 4, problems
    fine = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", name="resize")],
        "g",
        [tensor("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [tensor("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [scales],
    )
    onnx.save(
        helper.make_model(fine, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "b.onnx"
    )
    assert tensorrt_problems(tmp_path / "b.onnx") == []


@pytest.mark.slow
def test_missing_runtimes_and_bad_files_are_one_line_errors(
    formats, trained, tmp_path, monkeypatch
):
    ckpt, root = trained
    _, paths, _ = formats
    with monkeypatch.context() as hidden:
        for name in ("ncnn", "pnnx", "onnxslim"):
            hidden.setitem(sys.modules, name, None)  # as if not installed: importing it raises
        export = ["tools/export.py", "--ckpt", ckpt, "--size", "64x128"]
        line = one_line_error(
            in_process(*export, "--format", "ncnn", "--out", tmp_path / "m.param")
        )
        assert line.endswith("pip install pnnx ncnn"), line
        line = one_line_error(in_process(*export, "--simplify", "--out", tmp_path / "m.onnx"))
        assert line.endswith("pip install onnxslim"), line
        line = one_line_error(
            in_process("tools/deploy.py", "--model", paths["ncnn"], "--data-root", root)
        )
        assert line.endswith("pip install ncnn"), line
    (tmp_path / "lone.param").write_bytes(paths["ncnn"].read_bytes())  # no .bin, no .json beside it
    (tmp_path / "nobin.param").write_bytes(paths["ncnn"].read_bytes())
    (tmp_path / "nobin.json").write_bytes(paths["ncnn"].with_suffix(".json").read_bytes())
    calls = {
        "does not describe its classes": ["--model", tmp_path / "lone.param"],
        "nobin.bin are missing": ["--model", tmp_path / "nobin.param"],
    }
    for expected, argv in calls.items():
        line = one_line_error(in_process("tools/deploy.py", *argv, "--data-root", root))
        assert expected in line, (expected, line)
    flags = {
        "--dynamic is an ONNX option": ["--format", "ncnn", "--dynamic"],
        "--opset is an ONNX option": ["--format", "ncnn", "--opset", "17"],
        "argument --opset: '10': must be >= 11": ["--opset", "10"],
        "does not end in .param": ["--format", "ncnn", "--out", tmp_path / "m.onnx"],
    }
    for expected, argv in flags.items():
        line = one_line_error(in_process("tools/export.py", "--ckpt", ckpt, *argv))
        assert expected in line, (expected, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.param", "nobin.json", "nobin.param"]
