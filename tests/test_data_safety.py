"""A user's data is read as it is, or refused in one line naming the file: label formats (1-bit
masks, EXIF orientation), class descriptions (checkpoint metadata, classes.txt), folder layouts
(symlinks, one stem twice), damaged images and models, and settings that would give a wrong number.
Each test checks the number against the plain case or the exit code and the one line."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import (
    copy_of,
    digest,
    in_process,
    in_process_error,
    in_process_summary,
    one_line_error,
)
from PIL import Image
from reference_models import MmsegBiSeNetV1

import cityscapes
import datasets
import deploy
import evaluate
import export
import interop
import synthetic
from bisenet import BiSeNetV1, ModelConfig


# -- 1. labels read wrong --------------------------------------------------------------------------
def scored(ckpt, data, capsys):
    return in_process_summary(
        evaluate.main,
        ["--ckpt", ckpt, "--data-root", data, "--workers", "0", "--amp", "O0"],
        capsys,
    )


@pytest.mark.slow
def test_one_bit_masks_are_classes_0_and_1(tmp_path, capsys):
    data = synthetic.synthesize_folder(
        tmp_path / "masks", classes=2, train=2, val=3, height=64, width=128, seed=5
    )
    for label in (data / "ann_dir").rglob(
        "*.png"
    ):  # plain masks: 0 background, 1 object, nothing ignored
        mask = np.array(Image.open(label))
        Image.fromarray(np.where(mask == 255, 0, mask).astype(np.uint8)).save(label)
    torch.manual_seed(1)
    model = BiSeNetV1(ModelConfig(18, 2))
    ckpt = tmp_path / "m2.pth"
    torch.save(
        {
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "dataset": interop.folder_info(data).to_dict(),
        },
        ckpt,
    )
    plain = scored(ckpt, data, capsys)
    for label in (data / "ann_dir").rglob("*.png"):
        indices = np.array(Image.open(label))
        Image.fromarray(indices.astype(bool)).convert("1").save(label)  # what many mask tools write
        assert Image.open(label).mode == "1" and np.array_equal(
            datasets.read_label(label, interop.folder_info(data)), indices
        )
    assert scored(ckpt, data, capsys)["mIoU"] == plain["mIoU"]


@pytest.mark.slow
def test_exif_orientation_turns_images_and_labels_alike(my7, tmp_path, capsys):
    """Images and labels stored turned, each with the EXIF orientation that shows it upright: the
    same mIoU as the upright files (PNG images, so that no re-encoding differs)."""
    root, ckpt = my7
    data = copy_of(root, tmp_path)
    info = interop.folder_info(data)
    for image in sorted((data / "img_dir" / "val").rglob("*.jpg")):
        Image.open(image).save(image.with_suffix(".png"))
        image.unlink()
    plain = scored(ckpt, data, capsys)
    for image in sorted((data / "img_dir" / "val").rglob("*.png")):
        label = data / "ann_dir" / "val" / image.parent.name / image.name
        pixels, indices = datasets.read_image(image), datasets.read_label(label, info)
        exif = Image.Exif()
        exif[datasets.EXIF_ORIENTATION] = 6  # stored a quarter turn anticlockwise, shown upright
        Image.fromarray(np.ascontiguousarray(np.rot90(pixels))).save(image, exif=exif)
        palette_png = Image.fromarray(np.ascontiguousarray(np.rot90(indices))).convert("P")
        palette_png.putpalette([c for color in datasets.voc_palette(256) for c in color])
        palette_png.save(label, exif=exif)
        assert np.array_equal(datasets.read_image(image), pixels) and np.array_equal(
            datasets.read_label(label, info), indices
        )
    turned = scored(ckpt, data, capsys)
    assert turned["mIoU"] == plain["mIoU"] and turned["per_class"] == plain["per_class"]


def test_exif_orientations_match_pil(tmp_path):
    """The reader's mirrorings and turns against PIL's own exif_transpose, for every orientation."""
    from PIL import ImageOps

    pixels = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[datasets.EXIF_ORIENTATION] = orientation
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(pixels).save(path, exif=exif)
        assert np.array_equal(
            datasets.read_image(path), np.array(ImageOps.exif_transpose(Image.open(path)))
        ), orientation


# -- 2. checkpoints that do not describe their classes ---------------------------------------------
@pytest.mark.slow
def test_mmseg_meta_names_and_colours_the_classes(my7, tmp_path, capsys):
    root, _ = my7
    palette = [[10 * k, 255 - 10 * k, 7 * k] for k in range(7)]
    torch.manual_seed(2)
    reference = MmsegBiSeNetV1(18, 7).eval()
    mmseg = tmp_path / "mmseg7.pth"
    torch.save(
        {
            "state_dict": reference.state_dict(),
            "meta": {"CLASSES": [f"thing{k}" for k in range(7)], "PALETTE": palette},
        },
        mmseg,
    )
    images = sorted((root / "img_dir" / "val").rglob("*.jpg"))[0].parent
    for fmt in ("color", "trainIds"):
        in_process_summary(
            evaluate.main,
            [
                "--ckpt",
                mmseg,
                "--images",
                images,
                "--out-dir",
                tmp_path / "pred",
                "--format",
                fmt,
                "--workers",
                "0",
            ],
            capsys,
        )
    for color in (tmp_path / "pred").rglob("*_color.png"):
        indices = np.array(Image.open(str(color).replace("_color", "_trainIds")))
        assert np.array_equal(
            np.array(Image.open(color)), np.array(palette, dtype=np.uint8)[indices]
        )
    exported = in_process_summary(
        export.main,
        ["--ckpt", mmseg, "--out", tmp_path / "mmseg7.onnx", "--size", "64x128"],
        capsys,
    )
    assert exported["classes"] == [f"thing{k}" for k in range(7)]


def test_unnamed_classes_get_their_own_palette_and_a_malformed_description_is_one_line(
    my7, tmp_path, capsys
):
    root, _ = my7
    images = sorted((root / "img_dir" / "val").rglob("*.jpg"))[0].parent
    torch.manual_seed(3)
    coco = BiSeNetV1(ModelConfig(18, 171))  # e.g. COCO-Stuff, saved without a description
    bare = tmp_path / "coco.pth"
    torch.save({"model_config": coco.config.to_dict(), "model": coco.state_dict()}, bare)
    result = in_process_summary(
        evaluate.main,
        ["--ckpt", bare, "--images", images, "--out-dir", tmp_path / "coco", "--workers", "0"],
        capsys,
    )
    assert result["images"] == 1 and result["dataset"] == "unnamed classes"
    assert "no submission ids" in in_process_error(
        evaluate.main,
        ["--ckpt", bare, "--images", images, "--out-dir", tmp_path / "x", "--format", "labelIds"],
        capsys,
        allow_warnings=True,
    )
    broken = tmp_path / "broken.pth"
    torch.save(
        {
            "model_config": coco.config.to_dict(),
            "model": coco.state_dict(),
            "dataset": {"class_names": 5},
        },
        broken,
    )
    assert "its dataset description is malformed" in in_process_error(
        evaluate.main,
        ["--ckpt", broken, "--images", images, "--out-dir", tmp_path / "y"],
        capsys,
        allow_warnings=True,
    )


# -- 3. classes.txt --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("name,r,g,b\nroad,128,64,128\nsky,0,0,255\n", "'name,r,g,b': expected `name R G B`"),
        ("#unlabelled\nroad\nsky\n", "'#unlabelled': a comment is `# text` (with a space)"),
        (
            "road -1 0 0\nsky\n",
            "'road -1 0 0': expected `name R G B` with three whole numbers 0..255",
        ),
        ("road 128 64\nsky\n", "'road 128 64': expected `name R G B`"),
        ("road #ff00\nsky\n", "a colour is `#rrggbb` or `R G B`"),
        ("road\nsky\nroad\n", "the class name 'road' is on line 1 already"),
    ],
)
def test_malformed_classes_txt_is_named_by_line(my7, tmp_path, capsys, text, message):
    data = copy_of(my7[0], tmp_path)
    (data / "classes.txt").write_text(text)
    error = in_process_error(
        evaluate.main,
        ["--ckpt", my7[1], "--data-root", data, "--workers", "0"],
        capsys,
        allow_warnings=True,
    )
    assert f"{data / 'classes.txt'} line" in error and message in error, error


def test_classes_txt_in_csv_hex_utf16_is_read_and_latin1_is_named(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("road,128,64,128\nsky,0,0,255\n")
    assert interop.read_classes(path, "x").palette == ((128, 64, 128), (0, 0, 255))
    path.write_text("road #ff0000\nlane 2\n")
    info = interop.read_classes(path, "x")
    assert info.class_names == ("road", "lane 2") and info.palette[0] == (255, 0, 0)
    path.write_bytes("café 1 2 3\nroad\n".encode("utf-16"))
    assert interop.read_classes(path, "x").class_names == ("café", "road")
    path.write_bytes("café\nroad\n".encode("latin-1"))
    with pytest.raises(datasets.DataError, match="not UTF-8 text"):
        interop.read_classes(path, "x")


# -- 4. symlinked folders --------------------------------------------------------------------------
@pytest.mark.slow
def test_symlinked_sub_folders_are_followed_once(my7, tmp_path, capsys):
    root, ckpt = my7
    data = copy_of(root, tmp_path)
    for kind in ("img_dir", "ann_dir"):  # one scene of val moved away and linked back, plus a loop
        scene = data / kind / "val" / "scene1"
        shutil.move(scene, tmp_path / f"{kind}_scene1")
        scene.symlink_to(tmp_path / f"{kind}_scene1", target_is_directory=True)
        (tmp_path / f"{kind}_scene1" / "loop").symlink_to(
            tmp_path / f"{kind}_scene1", target_is_directory=True
        )
    assert scored(ckpt, data, capsys)["images"] == 2 == scored(ckpt, root, capsys)["images"]
    assert len(interop.find_images(data / "img_dir" / "val")) == 2


# -- 5. wrong numbers ------------------------------------------------------------------------------
def test_slide_stride_beyond_the_crop_and_tiny_scales_are_refused(my7, capsys):
    args = ["--ckpt", my7[1], "--data-root", my7[0]]
    assert "--stride: 96x96 is larger than --crop 64x64" in in_process_error(
        evaluate.main,
        [*args, "--mode", "slide", "--crop", "64x64", "--stride", "96x96"],
        capsys,
        allow_warnings=True,
    )
    assert "each scale must be 0.125 to 8" in in_process_error(
        evaluate.main, [*args, "--scales", "0.001"], capsys, allow_warnings=True
    )


@pytest.mark.slow
def test_unlabelled_splits_repeats_and_nan_scores(my7, tmp_path, capsys):
    root, ckpt = my7
    assert "--split test: " in in_process_error(
        evaluate.main,
        ["--ckpt", ckpt, "--data-root", root, "--split", "test"],
        capsys,
        allow_warnings=True,
    )
    listed = synthetic.synthesize_folder(
        tmp_path / "listed", classes=7, train=2, val=2, layout="list", seed=2
    )
    (listed / "val.txt").write_text((listed / "val.txt").read_text() * 2)
    assert "val.txt line 3 repeats line 1" in in_process_error(
        evaluate.main, ["--ckpt", ckpt, "--data-root", listed], capsys, allow_warnings=True
    )
    ignored = copy_of(root, tmp_path)
    for label in (ignored / "ann_dir" / "val").rglob("*.png"):
        png = Image.open(label)
        Image.fromarray(np.full(np.array(png).shape, 255, np.uint8)).convert("P").save(label)
    evaluate.main([str(a) for a in ["--ckpt", ckpt, "--data-root", ignored, "--workers", "0"]])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in last and json.loads(last)["mIoU"] is None


# -- 6. another dataset of the same class count ----------------------------------------------------
@pytest.mark.slow
def test_resume_on_other_classes_is_refused_and_evaluation_warns(my7, tmp_path, capsys):
    import train

    root, ckpt = my7
    small = "--depth 18 --batch-size 2 --crop 64x128 --workers 0 --iters 1 --no-validate --amp O0"
    small = small.split()
    in_process_summary(
        train.main, ["--data-root", root, "--work-dir", tmp_path / "wd", *small], capsys
    )
    other = copy_of(root, tmp_path, "other")
    (other / "classes.txt").write_text("".join(f"animal{k}\n" for k in range(7)))
    before = digest(tmp_path / "wd")
    error = in_process_error(
        train.main,
        ["--data-root", other, "--work-dir", tmp_path / "wd", *small, "--iters", "2", "--resume"],
        capsys,
        allow_warnings=True,
    )
    assert "a run on other classes (class 0 was 'class0', the data's is 'animal0')" in error
    checkpoints = lambda state: {k: v for k, v in state.items() if k.endswith(".pth")}  # noqa: E731  (the lock and log are the run's own)
    assert (
        checkpoints(digest(tmp_path / "wd")) == checkpoints(before)
        and len(checkpoints(before)) == 2
    )  # iter_1.pth and latest.pth
    error = in_process_error(
        train.main,
        ["--data-root", root, "--work-dir", tmp_path / "wd", *small, *"--depth 50".split()]
        + ["--iters", "2", "--resume"],
        capsys,
        allow_warnings=True,
    )
    assert "another model configuration (depth 18 -> 50" in error
    evaluate.main([str(a) for a in ["--ckpt", ckpt, "--data-root", other, "--workers", "0"]])
    assert (
        "warning: the model's classes are not the data's (class 0: 'class0' in the model, 'animal0'"
        in capsys.readouterr().err
    )
    cs = synthetic.synthesize_cityscapes(tmp_path / "cs", train=1, val=1, height=64, width=128)
    (cs / "classes.txt").write_text("a\nb\n")
    assert "a Cityscapes root (leftImg8bit/) trains Cityscapes' 19 classes" in in_process_error(
        evaluate.main, ["--ckpt", ckpt, "--data-root", cs], capsys, allow_warnings=True
    )


# -- 7. tracebacks and unclear messages ------------------------------------------------------------
@pytest.mark.slow
def test_broken_models_and_paths_get_one_clear_line(my7, tmp_path, capsys):
    root, ckpt = my7
    onnx = tmp_path / "m.onnx"
    in_process_summary(export.main, ["--ckpt", ckpt, "--out", onnx, "--size", "64x128"], capsys)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(onnx.read_bytes()[:5000])
    assert "not a readable .onnx model" in in_process_error(
        deploy.main, ["--model", truncated, "--data-root", root], capsys, allow_warnings=True
    )
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "the file is empty" in in_process_error(
        deploy.main,
        ["--model", tmp_path / "empty.onnx", "--data-root", root],
        capsys,
        allow_warnings=True,
    )
    for flag, script in (("--ckpt", evaluate.main), ("--load-from", None)):
        if script is None:
            import train

            error = in_process_error(
                train.main,
                ["--data-root", root, "--work-dir", tmp_path / "wd", "--load-from", onnx]
                + "--iters 1 --crop 64x128 --workers 0".split(),
                capsys,
                allow_warnings=True,
            )
        else:
            error = in_process_error(
                script, [flag, onnx, "--data-root", root], capsys, allow_warnings=True
            )
        assert (
            "an exported model, not a PyTorch checkpoint" in error
            and "--model" in error
            and "weights_only" not in error
        )
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "--out-dir" in in_process_error(
        evaluate.main,
        ["--ckpt", ckpt, "--data-root", root, "--out-dir", blocker / "sub"],
        capsys,
        allow_warnings=True,
    )
    assert "is a file; pass the data root" in in_process_error(
        export.main,
        ["--ckpt", ckpt, "--format", "openvino", "--out", tmp_path / "q.xml", "--int8"]
        + ["--calib-data", root / "classes.txt"],
        capsys,
        allow_warnings=True,
    )
    folder_named_png = copy_of(root, tmp_path, "odd")
    (folder_named_png / "img_dir" / "val" / "scene0" / "x.jpg").mkdir()
    assert scored(ckpt, folder_named_png, capsys)["images"] == 2  # a folder is not an image


def test_two_images_of_one_stem_are_refused_with_both_names(my7, tmp_path):
    """mmseg's layout pairs an image with ann_dir/<stem>.png: a stray a.png beside a.jpg was trained
    on and scored with the same label (val mIoU and "images" changed silently)."""
    root = copy_of(my7[0], tmp_path)
    image = sorted((root / "img_dir" / "val").rglob("*.jpg"))[0]
    shutil.copy(image, image.with_suffix(".png"))
    with pytest.raises(datasets.DataError) as error:
        cityscapes.open_dataset(root, "val")
    label = (
        root / "ann_dir" / "val" / image.relative_to(root / "img_dir" / "val").with_suffix(".png")
    )
    assert str(error.value).startswith(
        f"{image} and {image.with_suffix('.png')} both pair with {label}; keep one image per label"
    )


def test_a_truncated_jpeg_is_named_in_training_and_for_images(my7, tmp_path, capsys):
    """OpenCV returns a JPEG cut short with its lower part grey and only libjpeg's warning, which
    names no file."""
    root = copy_of(my7[0], tmp_path)
    image = sorted((root / "img_dir" / "train").rglob("*.jpg"))[0]
    whole = datasets.read_image(image)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    assert cv2.imread(str(image)) is not None  # the reason: OpenCV reads it
    with pytest.raises(
        datasets.DataError,
        match=rf"^{image}: the image cannot be decoded whole \(Premature end of JPEG file",
    ):
        datasets.read_image(image)
    args = [
        "--data-root",
        root,
        "--work-dir",
        tmp_path / "wd",
        "--depth",
        "18",
        "--batch-size",
        "4",
        "--crop",
        "64x128",
        "--iters",
        "2",
        "--workers",
        "0",
    ]
    assert f"{image}: the image cannot be decoded whole" in one_line_error(
        in_process("train.py", *args, "--no-validate")
    )
    error = one_line_error(
        in_process(
            "evaluate.py",
            "--ckpt",
            my7[1],
            "--images",
            image.parent,
            "--out-dir",
            tmp_path / "p",
            "--workers",
            "0",
        )
    )
    assert f"{image}: the image cannot be decoded whole" in error
    assert whole.shape[2] == 3


def test_a_jpeg_with_a_flipped_bit_is_named_not_read_garbled(my7, tmp_path):
    """A bit flipped in the compressed data desynchronises the decoder: OpenCV and PIL return
    garbled blocks with no error; libjpeg's own complaint ("Corrupt JPEG data") makes it a DataError
    naming the file. (A flip that still decodes as valid data cannot be told from the image: JPEG
    has no checksum.)"""
    root = copy_of(my7[0], tmp_path)
    image = sorted((root / "img_dir" / "train").rglob("*.jpg"))[0]
    whole, data = cv2.imread(str(image)), bytearray(image.read_bytes())
    scan_header = data.index(b"\xff\xda") + 2
    data[scan_header + int.from_bytes(data[scan_header : scan_header + 2], "big")] ^= (
        0x10  # the first byte of compressed data
    )
    image.write_bytes(bytes(data))
    garbled = cv2.imread(str(image))
    assert (
        garbled is not None and np.asarray(Image.open(image).convert("RGB")).shape == whole.shape
    )  # the reason: both decoders read it
    assert (
        np.abs(garbled.astype(int) - whole).max(axis=2) > 40
    ).mean() > 0.01  # and it is not the image any more
    with pytest.raises(
        datasets.DataError,
        match=rf"^{image}: the image cannot be decoded whole \(Corrupt JPEG data",
    ):
        datasets.read_image(image)


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".webp"])
def test_images_in_other_formats_are_read_not_skipped(my7, tmp_path, suffix):
    root = copy_of(my7[0], tmp_path)
    jpegs = sorted((root / "img_dir" / "train").rglob("*.jpg"))
    pixels = {}
    for jpeg in jpegs[:2]:
        bgr = cv2.imread(str(jpeg))
        other = jpeg.with_suffix(suffix)
        assert cv2.imwrite(
            str(other), bgr, [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []
        )  # lossless
        jpeg.unlink()
        pixels[other] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    dataset = cityscapes.open_dataset(root, "train")
    assert len(dataset) == len(jpegs)
    for path, rgb in pixels.items():
        assert (
            path,
            root
            / "ann_dir"
            / "train"
            / path.relative_to(root / "img_dir" / "train").with_suffix(".png"),
        ) in dataset.samples
        assert np.array_equal(datasets.read_image(path), rgb)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["missing", "outside its folder"])
def test_an_onnx_model_whose_external_data_is_missing_or_outside_is_one_line(
    my7, tmp_path, capsys, where
):
    onnx = pytest.importorskip("onnx")
    root, ckpt = my7
    in_process_summary(
        export.main, ["--ckpt", ckpt, "--out", tmp_path / "m.onnx", "--size", "64x128"], capsys
    )
    proto = onnx.load(tmp_path / "m.onnx")
    (tmp_path / "model").mkdir()
    onnx.save_model(
        proto,
        tmp_path / "model" / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    if where == "missing":
        (tmp_path / "model" / "weights.data").unlink()
    # the file names its data as ../weights.data (onnx's own writer refuses to; a hand-edited file
    # may)
    else:
        (tmp_path / "model" / "weights.data").rename(tmp_path / "weights.data")
        proto = onnx.load(tmp_path / "model" / "m.onnx", load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                entry.value = "../weights.data" if entry.key == "location" else entry.value
        onnx.save(proto, tmp_path / "model" / "m.onnx")
    error = in_process_error(
        deploy.main,
        ["--model", tmp_path / "model" / "m.onnx", "--data-root", root],
        capsys,
        allow_warnings=True,
    )
    assert error.startswith(
        f"error: --model {tmp_path / 'model' / 'm.onnx'}: ONNX Runtime cannot load it ("
    ) and error.endswith("export it again with python tools/export.py")


@pytest.mark.slow
def test_an_image_over_pils_pixel_limit_is_read_not_a_traceback(tmp_path):
    """PIL refuses images over 179 megapixels (DecompressionBombError, 52 lines); OpenCV reads them,
    unturned."""
    height, width = 9000, 20000  # 180 megapixels
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((height, width, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "big_label.png"), np.ones((height, width), np.uint8))
    assert datasets.read_image(tmp_path / "big.png").shape == (height, width, 3)
    assert datasets.read_label(tmp_path / "big_label.png", datasets.unnamed_classes(2)).max() == 1
