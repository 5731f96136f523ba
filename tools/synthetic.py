"""Synthetic datasets in the exact layouts real data comes in: the demo, the tests and the
benchmarks train on them.

    # street scenes: leftImg8bit PNGs, gtFine polygons JSON, labelIds PNGs
    python tools/synthetic.py cityscapes OUT --train 20 --val 6
    # your own data's layouts, any class count
    python tools/synthetic.py folder OUT --classes 7 [--layout mmseg|list|camvid]

Each writes only into a new or empty folder, and the same seed gives the same bytes.
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules live one folder up

import cli
from cityscapes import IMAGE_SUFFIX
from cli import DataError
from convert_labels import convert_dataset
from datasets import IGNORE_INDEX, DatasetInfo, voc_palette
from interop import CAMVID, LAYOUTS


def new_dataset_folder(out):
    """A synthesizer writes only into a new or empty folder: over a dataset it would mix its files
    with the user's."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out} already exists and is not empty; synthesize writes a new dataset: pass a "
            "new folder (nothing was written)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- Cityscapes: street scenes drawn as polygons, written in the real gtFine JSON format -----------
CITIES = ("synthburg", "fakefurt", "mockheim")
APPEARANCE = {  # label -> (base RGB, per-object color jitter)
    "sky": ((135, 175, 215), 20),
    "building": ((120, 105, 95), 45),
    "wall": ((170, 160, 140), 20),
    "fence": ((140, 120, 90), 20),
    "vegetation": ((70, 115, 45), 25),
    "terrain": ((150, 160, 90), 20),
    "road": ((85, 85, 90), 10),
    "sidewalk": ((160, 145, 150), 15),
    "pole": ((110, 110, 115), 15),
    "traffic sign": ((210, 190, 40), 40),
    "traffic light": ((40, 40, 35), 10),
    "car": ((120, 120, 130), 110),
    "truck": ((170, 170, 160), 60),
    "bus": ((200, 180, 60), 50),
    "person": ((110, 80, 90), 70),
    "rider": ((140, 60, 60), 60),
    "bicycle": ((50, 50, 60), 30),
    "ego vehicle": ((30, 30, 35), 5),
    "static": ((100, 90, 80), 40),
}


# what a plain scene leaves out: thin or small things, which take a model thousands of iterations to
# find
THIN = (
    "pole",
    "traffic sign",
    "traffic light",
    "wall",
    "fence",
    "rider",
    "bicycle",
    "license plate",
    "static",
)


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _blob(rng, cx, cy, rx, ry, points=14):
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.7, 1.0, points)
    return [[cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)] for a, r in zip(angles, radius)]


def synthetic_scene(rng, height, *, width):
    """Objects in drawing order (later ones cover earlier ones, as in real Cityscapes
    annotations)."""
    horizon = height * rng.uniform(0.38, 0.5)
    vanish_x = width * rng.uniform(0.35, 0.65)
    view = (height, width, horizon, vanish_x)
    objects = street(rng, *view) + poles_and_signs(rng, height, width)
    objects += vehicles(rng, *view) + people(rng, *view)
    if rng.random() < 0.5:
        x0 = rng.uniform(0, width * 0.9)
        objects.append(("static", _box(x0, height * 0.8, x0 + width * 0.04, height * 0.9)))
    H, W = height, width
    objects.append(
        ("ego vehicle", [[0, H], [0, H * 0.93], [W / 2, H * 0.9], [W, H * 0.93], [W, H]])
    )
    return [
        (label, [[int(round(px)), int(round(py))] for px, py in poly]) for label, poly in objects
    ]


def street(rng, H, W, horizon, vanish_x):
    """Sky, buildings, vegetation, a wall or fence, terrain, sidewalks and the road."""
    objects = [("sky", _box(0, 0, W, horizon + 2))]
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        w = W * rng.uniform(0.08, 0.22)
        objects.append(("building", _box(x, H * rng.uniform(0.03, 0.3), x + w, horizon + H * 0.05)))
        x += w * rng.uniform(0.8, 1.05)
    for _ in range(rng.integers(1, 4)):
        objects.append(
            ("vegetation", _blob(rng, rng.uniform(0, W), horizon - H * 0.05, W * 0.08, H * 0.12))
        )
    if rng.random() < 0.6:
        x0 = rng.uniform(0, 0.6) * W
        wall = _box(x0, horizon - H * 0.06, x0 + W * 0.3, horizon + H * 0.04)
        objects.append((rng.choice(["wall", "fence"]), wall))
    objects.append(
        ("terrain", [[0, horizon + H * 0.03], [W * 0.25, horizon + H * 0.03], [0, H * 0.75]])
    )
    for side in (0, W):  # the left sidewalk, then the right one
        inward = 1 if side == 0 else -1
        kerb = [[vanish_x - inward * W * 0.05, horizon], [vanish_x, horizon]]
        near = [[side + inward * W * 0.15, H]]
        objects.append(("sidewalk", [[side, H], [side, H * 0.7], *kerb, *near]))
    road = [[W * 0.12, H], [vanish_x - W * 0.02, horizon], [vanish_x + W * 0.02, horizon]]
    objects.append(("road", [*road, [W * 0.88, H]]))
    return objects


def poles_and_signs(rng, H, W):
    objects = []
    for _ in range(rng.integers(2, 5)):
        px = rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)]) * W
        base, top = H * rng.uniform(0.62, 0.85), H * rng.uniform(0.15, 0.3)
        objects.append(("pole", _box(px, top, px + W * 0.006, base)))
        if rng.random() < 0.7:
            label = rng.choice(["traffic sign", "traffic light"])
            s = W * 0.02
            bottom = top + (s if label == "traffic sign" else 2 * s)
            objects.append((label, _box(px - s / 2, top, px + s, bottom)))
    return objects


def vehicles(rng, H, W, horizon, vanish_x):
    objects = []
    for _ in range(rng.integers(1, 5)):
        y = rng.uniform(horizon + H * 0.05, H * 0.85)
        scale = (y - horizon) / (H - horizon)
        cx = vanish_x + (rng.uniform(-0.7, 0.7) * W * 0.5) * scale
        label = rng.choice(["car", "car", "car", "truck", "bus"])
        w = W * 0.25 * scale * (1.6 if label != "car" else 1.0)
        h = w * (0.55 if label == "car" else 0.9)
        body = [[cx - w / 2, y], [cx - w / 2, y - h * 0.55], [cx - w * 0.3, y - h]]
        body += [[cx + w * 0.3, y - h], [cx + w / 2, y - h * 0.55], [cx + w / 2, y]]
        objects.append((label, body))
        if rng.random() < 0.3:
            plate = _box(cx - w * 0.08, y - h * 0.25, cx + w * 0.08, y - h * 0.15)
            objects.append(("license plate", plate))
    return objects


def people(rng, H, W, horizon, vanish_x):
    """Pedestrians, and riders on bicycles."""
    objects = []
    for _ in range(rng.integers(1, 5)):
        y = rng.uniform(horizon + H * 0.1, H * 0.95)
        scale = (y - horizon) / (H - horizon)
        side = rng.choice([-1, 1])
        cx = vanish_x + side * rng.uniform(0.45, 0.9) * W * 0.5 * scale
        h, w = H * 0.45 * scale, W * 0.03 * scale
        if rng.random() < 0.25:
            objects.append(("bicycle", _box(cx - 2.5 * w, y - h * 0.35, cx + 2.5 * w, y)))
            objects.append(("rider", _blob(rng, cx, y - h * 0.65, w, h * 0.35, 10)))
        else:
            body = [[cx - w, y], [cx - w, y - h * 0.8], [cx, y - h], [cx + w, y - h * 0.8]]
            objects.append(("person", [*body, [cx + w, y]]))
    return objects


def render_image(objects, rng, *, height, width, plain=False):
    """Per-object colour, then shading, lighting gradient and sensor noise, so classes are not
    colour-coded. plain: each class its base colour under even light with faint noise, which,
    without the THIN classes, a model learns in a few hundred iterations
    (tools/benchmark_learning.py --data fast)."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for label, polygon in objects:
        base, jitter = APPEARANCE.get(label, ((128, 128, 128), 0))
        color = np.clip(np.array(base) + rng.integers(-jitter, jitter + 1, 3) * (not plain), 0, 255)
        draw.polygon([tuple(p) for p in polygon], fill=tuple(int(c) for c in color))
    pixels = np.asarray(image).astype(np.float32)
    if plain:
        return np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light = rng.uniform(0.75, 1.2) * (
        1 + 0.25 * (xs / width - 0.5) * rng.uniform(-1, 1) + 0.1 * np.sin(ys / 37.0)
    )
    texture = rng.normal(0, rng.uniform(4, 12), (height, width, 1)) + rng.normal(0, 4, pixels.shape)
    return np.clip(pixels * light[..., None] + texture, 0, 255).astype(np.uint8)


def synthesize_one(job):
    """One image of a split (a job of synthesize_cityscapes): leftImg8bit PNG, gtFine polygons JSON,
    labelIds PNG drawn by cityscapesscripts."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    out, split, i = job["out"], job["split"], job["i"]
    height, width, plain = job["height"], job["width"], job["plain"]
    rng = np.random.default_rng([job["seed"], job["split_index"], i])
    city = CITIES[i % len(CITIES)]
    stem = f"{city}_{i // len(CITIES):06d}_{19 + i:06d}"
    objects = synthetic_scene(rng, height, width=width)
    objects = [(label, polygon) for label, polygon in objects if not (plain and label in THIN)]
    image_dir, label_dir = out / "leftImg8bit" / split / city, out / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_image(objects, rng, height=height, width=width, plain=plain)).save(
        image_dir / f"{stem}{IMAGE_SUFFIX}"
    )
    annotation = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [
            {
                "date": "",
                "deleted": 0,
                "id": k,
                "label": label,
                "polygon": poly,
                "user": "synthetic",
                "verified": 0,
            }
            for k, (label, poly) in enumerate(objects)
        ],
    }
    json_path = label_dir / f"{stem}_gtFine_polygons.json"
    json_path.write_text(json.dumps(annotation, indent=1))
    json2labelImg(str(json_path), str(label_dir / f"{stem}_gtFine_labelIds.png"), "ids")


def synthesize_cityscapes(
    out_dir, train=20, *, val=6, test=0, height=512, width=1024, seed=0, nproc=1, plain=False
):
    """Write leftImg8bit PNGs, gtFine polygons JSON and labelIds PNGs; each image depends only on
    (seed, split, index) (plain: see render_image)."""
    out = new_dataset_folder(out_dir)
    sizes = {"height": height, "width": width}
    jobs = [
        {"out": out, "split_index": k, "split": split, "i": i, "seed": seed, "plain": plain} | sizes
        for k, (split, count) in enumerate((("train", train), ("val", val), ("test", test)))
        for i in range(count)
    ]
    if nproc > 1 and len(jobs) > 1:
        with cli.process_pool(nproc) as pool:
            pool.map(synthesize_one, jobs, chunksize=1)
    else:
        for job in jobs:
            synthesize_one(job)
    return out


def trainable_cityscapes(out_dir, *, nproc=1, **sizes):
    """synthesize_cityscapes, then the trainIds labels and split lists of convert_labels.py: a root
    train.py reads."""
    synthesize_cityscapes(out_dir, nproc=nproc, **sizes)
    failures = convert_dataset(out_dir, source="labelIds", nproc=nproc, progress=False)
    if failures:
        raise DataError(
            f"{out_dir}: {len(failures)} synthetic labels did not convert (first: {failures[0]})"
        )
    return Path(out_dir)


# -- Your own data's layouts: textured class regions -----------------------------------------------
def synthetic_pair(rng, info, *, height, width):
    """An image of textured class regions (each class its own colour) and its label, 255 along some
    borders."""
    label = np.full((height, width), rng.integers(info.num_classes), dtype=np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        cls = int(rng.integers(info.num_classes))
        center = (int(rng.integers(width)), int(rng.integers(height)))
        axes = (
            int(rng.integers(width // 10, width // 3)),
            int(rng.integers(height // 10, height // 3)),
        )
        cv2.ellipse(label, center, axes, float(rng.uniform(0, 180)), 0, 360, cls, -1)
    edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    image = info.colors[label].astype(np.int16) + rng.integers(-25, 26, (height, width, 3))
    label[edges & (rng.random((height, width)) < 0.5)] = IGNORE_INDEX
    return np.clip(image, 0, 255).astype(np.uint8), label


def synthesize_folder(
    out_dir, classes=7, *, train=12, val=4, test=0, height=128, width=256, layout="mmseg", seed=0
):
    """A dataset of `classes` classes in a generic layout, classes.txt included; the same seed gives
    the same bytes. mmseg's layout gets palette PNG labels (as VOC-style tools write them), the
    others grey ones."""
    out = new_dataset_folder(out_dir)
    info = (
        CAMVID
        if layout == "camvid"
        else DatasetInfo(
            out.name, tuple(f"class{k}" for k in range(classes)), tuple(voc_palette(classes))
        )
    )
    if layout != "camvid":
        (out / "classes.txt").write_text(
            "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(info.class_names, info.palette))
        )
    for split_number, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        lines = []
        for i in range(count):
            rng = np.random.default_rng((seed, split_number, i))
            image, label = synthetic_pair(rng, info, height=height, width=width)
            if layout == "camvid":
                label[label == IGNORE_INDEX] = info.void_value
            image_rel, label_rel = {
                "mmseg": (
                    f"img_dir/{split}/scene{i % 2}/{split}_{i:04d}.jpg",
                    f"ann_dir/{split}/scene{i % 2}/{split}_{i:04d}.png",
                ),
                "list": (f"images/{split}_{i:04d}.png", f"labels/{split}_{i:04d}.png"),
                "camvid": (f"{split}/{split}_{i:04d}.png", f"{split}annot/{split}_{i:04d}.png"),
            }[layout]
            for rel in (image_rel, label_rel):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / image_rel, quality=95) if image_rel.endswith(
                ".jpg"
            ) else Image.fromarray(image).save(out / image_rel)
            png = Image.fromarray(label)
            if layout == "mmseg":
                png = png.convert("P")
                png.putpalette([c for color in voc_palette(256) for c in color])
            png.save(out / label_rel)
            lines.append(f"{image_rel},{label_rel}\n")
        if layout == "list" and count:
            (out / f"{split}.txt").write_text("".join(lines))
    return out


def add_dataset_flags(parser, *, min_train, train, val, height, width):
    """What both generators take: the folder, each split's image count, the image size and the
    seed."""
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=cli.integer(min_train), default=train)
    parser.add_argument("--val", type=cli.integer(0), default=val)
    parser.add_argument("--test", type=cli.integer(0), default=0)
    parser.add_argument("--height", type=cli.integer(32), default=height)
    parser.add_argument("--width", type=cli.integer(32), default=width)
    parser.add_argument("--seed", type=cli.integer(0), default=0)


def run(argv):
    parser = cli.ArgumentParser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    street = commands.add_parser("cityscapes", help="street scenes in the exact Cityscapes layout")
    add_dataset_flags(street, min_train=0, train=20, val=6, height=1024, width=2048)
    street.add_argument("--nproc", type=cli.integer(1), default=1, help="parallel processes")
    folder = commands.add_parser("folder", help="class regions in one of your own data's layouts")
    add_dataset_flags(folder, min_train=1, train=12, val=4, height=128, width=256)
    folder.add_argument(
        "--classes", type=cli.integer(2, 255), default=7, help="class count (CamVid: always its 11)"
    )
    folder.add_argument("--layout", default="mmseg", choices=LAYOUTS)
    args = parser.parse_args(argv)
    sizes = dict(
        train=args.train,
        val=args.val,
        test=args.test,
        height=args.height,
        width=args.width,
        seed=args.seed,
    )
    if args.command == "cityscapes":
        synthesize_cityscapes(args.out_dir, **sizes, nproc=args.nproc)
        layout = "Cityscapes"
    else:
        synthesize_folder(args.out_dir, classes=args.classes, layout=args.layout, **sizes)
        layout = args.layout
    print(
        f"wrote {args.train} train, {args.val} val, {args.test} test images ({layout} layout) "
        f"to {args.out_dir}"
    )


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    main()
