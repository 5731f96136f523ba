"""What other tools write, read here only when a run is given it: your own data in the folder
layouts of other repositories (below ROOT; docs/your-data.md), and other repositories' weights.

    classes.txt  one class a line in index order: `name`, `name R G B`, `name,R,G,B`, `name #rrggbb`
    mmseg        img_dir/{train,val,test}/**/*.{jpg,png} and ann_dir/{train,val}/**/*.png
    list         CoinCheung's {train,val}.txt: `image_path,label_path` lines, relative or absolute
    camvid       SegNet's {train,val,test}/*.png, {train,val,test}annot/*.png; 11 classes, 11 = void

    CoinCheung/BiSeNet's released state dict, mmsegmentation's {'state_dict', 'meta'} (with the
    classes its meta records), torchvision's ImageNet ResNets (--pretrained): their parameter names
    mapped to bisenet.py's.

cityscapes.open_dataset and checkpoints.py import it when a data root is not Cityscapes or a file is
not ours.
"""

import os
import re
from pathlib import Path

from bisenet import RESNET_LAYOUTS, ModelConfig
from cli import CheckpointError, DataError
from datasets import IGNORE_INDEX, IMAGE_EXTENSIONS, DatasetInfo, voc_palette

LAYOUTS = ("mmseg", "list", "camvid")
# CoinCheung's Cityscapes statistics, published on 0..1 RGB; the model takes 0..255, hence the 255
CITYSCAPES_MEAN = tuple(255 * v for v in (0.3257, 0.3690, 0.3223))
CITYSCAPES_STD = tuple(255 * v for v in (0.2112, 0.2148, 0.2115))


# -- Your own data ------------------------------------------------------------------------------
# SegNet's CamVid: 11 classes in this order, colours from its tutorial, 11 = void
CAMVID = DatasetInfo(
    "camvid",
    (
        "sky",
        "building",
        "pole",
        "road",
        "pavement",
        "tree",
        "sign symbol",
        "fence",
        "car",
        "pedestrian",
        "bicyclist",
    ),
    (
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ),
    void_value=11,
)


def classes_text(path):
    """classes.txt's text: UTF-8 (BOM or not) or UTF-16 with a BOM; anything else is refused."""
    data = Path(path).read_bytes()
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (Latin-1?); save it as UTF-8") from None


def read_classes(path, name):
    """ROOT/classes.txt -> DatasetInfo. Every line but empty ones and `# comments` is a class, in
    index order: `name`, `name R G B` or `name,R,G,B` (CSV), the colour 0..255 each or `#rrggbb`; a
    name may contain spaces and end in one number."""
    names, colors, lines = [], [], {}
    for number, line in enumerate(classes_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if re.match(r"#(\s|$)", line.lstrip()):  # `# ...` is a comment
            continue
        # `#unlabelled`: a class or a comment? Skipping it would shift every index after it
        if line.lstrip().startswith("#"):
            fix = "a comment is `# text` (with a space); rename the class if it is one"
            raise DataError(f"{where}: {line.strip()!r}: {fix}")
        words = [w.strip() for w in line.split(",")] if "," in line else line.split()
        numbers = 0  # how many words at the end are numbers
        while numbers < len(words) and re.fullmatch(r"[-+]?\d+(\.\d*)?", words[-1 - numbers]):
            numbers += 1
        color = None
        if re.fullmatch(r"#[0-9a-fA-F]{6}", words[-1]):
            words, color = words[:-1], tuple(int(words[-1][i : i + 2], 16) for i in (1, 3, 5))
        # a colour, or numbers meant as one (a CSV header is refused here)
        elif numbers >= 3 or (numbers == 2 and len(words) > 2) or ("," in line and len(words) > 1):
            tail = words[-3:]
            rgb = all(re.fullmatch(r"\d+", w) and int(w) <= 255 for w in tail)
            if not (len(words) > 3 and numbers >= 3 and rgb):
                expected = "expected `name R G B` with three whole numbers 0..255 (or `#rrggbb`)"
                raise DataError(f"{where}: {line.strip()!r}: {expected}")
            words, color = words[:-3], tuple(int(w) for w in tail)
        elif "#" in line:
            raise DataError(f"{where}: {line.strip()!r}: a colour is `#rrggbb` or `R G B`")
        label = " ".join(words)
        if not label:
            raise DataError(f"{where}: {line.strip()!r}: the class has no name")
        if label in lines:
            raise DataError(
                f"{where}: the class name {label!r} is on line {lines[label]} already; "
                "class names must differ"
            )
        lines[label] = number
        names.append(label)
        colors.append(color)
    if not 2 <= len(names) <= IGNORE_INDEX:
        raise DataError(
            f"{path}: {len(names)} classes; expected 2 to 255, one `name [R G B]` per line"
        )
    defaults = voc_palette(len(names))
    return DatasetInfo(name, tuple(names), tuple(c or d for c, d in zip(colors, defaults)))


def folder_layout(root):
    """Which of the generic layouts ROOT holds: 'list', 'mmseg' or 'camvid' (None: none of them)."""
    root = Path(root)
    if (root / "train.txt").is_file() and "," in (root / "train.txt").read_text().split("\n", 1)[0]:
        return "list"
    if (root / "img_dir").is_dir():
        return "mmseg"
    if (root / "trainannot").is_dir() or (root / "valannot").is_dir():
        return "camvid"
    return None


def folder_info(root):
    """ROOT/classes.txt, or the shipped CamVid classes for a CamVid root without one."""
    root = Path(root)
    if (root / "classes.txt").is_file():
        return read_classes(root / "classes.txt", root.name)
    if folder_layout(root) == "camvid":
        return CAMVID
    raise DataError(
        f"{root / 'classes.txt'}: missing; write one class per line in index order, "
        "`name R G B` (docs/your-data.md)"
    )


def image_files(folder):
    """Every image file below folder, symlinked sub-folders followed; each real folder is read once,
    so a link loop ends and a folder linked twice is not counted twice."""
    found, seen = [], set()
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [Path(directory) / n for n in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def find_images(path):
    """Images for label-free inference: one file, or every image below a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image or folder")
    images = image_files(path)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return images


def pair_by_stem(images_dir, labels_dir, *, label_name):
    """(image, label) per image below images_dir; the label: same relative path in labels_dir."""
    images = image_files(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    samples, owners = [], {}
    for image in images:
        label = labels_dir / image.relative_to(images_dir).parent / label_name(image)
        if not label.is_file():
            raise DataError(f"{label}: missing label for {image}")
        # a.jpg and a stray a.png would both be trained on and scored with one label
        if label in owners:
            fix = f"keep one image per label (move the other out of {images_dir})"
            raise DataError(f"{owners[label]} and {image} both pair with {label}; {fix}")
        owners[label] = image
        samples.append((image, label))
    return samples


def folder_samples(root, split, *, with_labels=True):
    """(image_path, label_path | None) of a split in one of the generic layouts."""
    root = Path(root)
    layout = folder_layout(root)
    if layout == "list":
        list_file = root / f"{split}.txt"
        if not list_file.is_file():
            expected = "expected one `image_path,label_path` per line"
            raise DataError(f"{list_file}: split '{split}' not found; {expected}")
        samples, seen = [], {}
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            # training may repeat a line to sample it more often
            if split != "train" and line.strip() in seen:
                repeat = f"{list_file} line {number} repeats line {seen[line.strip()]}"
                raise DataError(f"{repeat}: an image scored twice counts twice; remove the repeat")
            seen.setdefault(line.strip(), number)
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2:
                raise DataError(
                    f"{list_file} line {number}: expected `image_path,label_path`, got {line!r}"
                )
            image, label = (root / p for p in parts)  # an absolute path stays absolute
            for path in (image, label):
                if not path.is_file():
                    raise DataError(f"{path}: listed in {list_file} line {number} but missing")
            samples.append((image, label if with_labels else None))
        if not samples:
            raise DataError(f"{list_file}: no samples")
        return samples
    if layout in ("mmseg", "camvid"):
        images_dir = root / "img_dir" / split if layout == "mmseg" else root / split
        labels_dir = root / "ann_dir" / split if layout == "mmseg" else root / f"{split}annot"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir}: split '{split}' not found")
        if not with_labels:
            return [(p, None) for p in image_files(images_dir)]
        return pair_by_stem(images_dir, labels_dir, label_name=lambda image: image.stem + ".png")
    raise DataError(
        f"{root}: no known layout; expected img_dir/ + ann_dir/ (mmseg), "
        "train.txt of `image,label` lines (CoinCheung), "
        "train/ + trainannot/ (CamVid), or leftImg8bit/ + gtFine/ (Cityscapes)"
    )


# -- Other repositories' weights ------------------------------------------------------------------
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
    (
        r"backbone\.spatial_path\.layer([1-4])\.(.+)",
        lambda m: f"spatial_path.{int(m[1]) - 1}.{m[2]}",
    ),
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
    """ResNet depth from backbone keys: block type from conv3, block counts from layer indices."""
    indices = [
        [int(m[1]) for k in state if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.", k))]
        for i in range(1, 5)
    ]
    blocks = tuple(max(found, default=-1) + 1 for found in indices)
    block = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    for depth, layout in RESNET_LAYOUTS.items():
        if layout == (block, blocks):
            return depth
    raise CheckpointError(
        f"{source}: backbone with {block} blocks {blocks} is not a ResNet-18 or ResNet-50"
    )


def foreign_state(checkpoint, source):
    """(ModelConfig, our state dict, the classes it records or None) of CoinCheung's released state
    dict or an mmseg {'state_dict', 'meta'}."""
    if "state_dict" in checkpoint:
        state, rules, extra = checkpoint["state_dict"], MMSEG_RULES, dict(ffm_attention_relu=True)
    elif any(k.startswith("cp.resnet.") for k in checkpoint):
        state, rules, extra = (
            checkpoint,
            COINCHEUNG_RULES,
            dict(ffm_attention_relu=False, dropout=0.0, mean=CITYSCAPES_MEAN, std=CITYSCAPES_STD),
        )
    else:
        raise CheckpointError(
            f"{source}: unknown layout (first keys {list(checkpoint)[:5]}); "
            "expected ours, CoinCheung's or mmseg's"
        )
    state = rename_keys({k.removeprefix("module."): v for k, v in state.items()}, rules, source)
    if "head.classifier.weight" not in state:
        raise CheckpointError(f"{source}: no segmentation head weights found")
    config = ModelConfig(
        infer_depth(state, source), state["head.classifier.weight"].shape[0], **extra
    )
    return config, state, mmseg_dataset(checkpoint.get("meta"))


def backbone_state(state, source):
    """An ImageNet ResNet state dict in torchvision's format (or under 'state_dict'), fc.* dropped,
    for model.backbone."""
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return rename_keys(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, TORCHVISION_RULES, source
    )


def mmseg_dataset(meta):
    """The classes and palette an mmseg checkpoint records (0.x: meta CLASSES/PALETTE; 1.x: meta
    dataset_meta), as a dataset description, or None."""
    if not isinstance(meta, dict):
        return None
    names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names, palette = meta["dataset_meta"].get("classes"), meta["dataset_meta"].get("palette")
    if not names:
        return None
    return {
        "name": "from the checkpoint's mmseg meta",
        "class_names": list(names),
        "palette": [list(c) for c in palette] if palette else None,
    }
