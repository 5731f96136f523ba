"""Write gtFine/*_gtFine_labelTrainIds.png and {train,val,test}.txt for a Cityscapes root.

    python convert_labels.py ROOT --nproc 8          # official: cityscapesscripts' json2labelImg
    python convert_labels.py ROOT --source labelIds  # same bytes, from the shipped labelIds PNGs
    python convert_labels.py ROOT --benchmark        # files/s of both sources, no files written

Converted files are skipped unless --force; a broken input is named and the rest still converts.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

import cli
from cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, LABELID_TO_TRAINID
from cli import atomic_write
from datasets import DataError

SOURCE_SUFFIX = {"polygons": "_gtFine_polygons.json", "labelIds": "_gtFine_labelIds.png"}


def convert_one(job):
    """Returns None on success, else 'path: reason'."""
    source_path, target_path, source = job
    try:
        with atomic_write(target_path, suffix=".tmp.png") as tmp:
            if source == "polygons":
                from cityscapesscripts.preparation.json2labelImg import json2labelImg

                json2labelImg(str(source_path), str(tmp), "trainIds")
            else:
                label_ids = cv2.imread(str(source_path), cv2.IMREAD_UNCHANGED)
                if label_ids is None or label_ids.ndim != 2 or label_ids.dtype != np.uint8:
                    raise DataError("not a single-channel 8-bit labelIds PNG")
                # PIL, as json2labelImg: same bytes
                Image.fromarray(cv2.LUT(label_ids, LABELID_TO_TRAINID)).save(tmp, format="PNG")
        return None
    except DataError as e:
        return f"{source_path}: {e}"
    except (SystemExit, Exception) as e:  # cityscapesscripts calls sys.exit on unknown labels
        return f"{source_path}: {type(e).__name__}: {e}"


def conversion_jobs(root, source, *, force):
    root = Path(root)
    suffix = SOURCE_SUFFIX[source]
    jobs = []
    for source_path in sorted((root / "gtFine").glob(f"*/*/*{suffix}")):
        target = source_path.with_name(source_path.name.replace(suffix, LABEL_SUFFIX))
        if force or not target.exists():
            jobs.append((source_path, target, source))
    return jobs


def write_split_lists(root, log=print):
    """mmseg's list format, one 'city/city_seq_frame' per line, for every split with images and no
    list yet; a list already there (yours, or CoinCheung's `image,label` lines) stays."""
    root = Path(root)
    for split_dir in sorted(p for p in (root / "leftImg8bit").iterdir() if p.is_dir()):
        stems = sorted(
            p.relative_to(split_dir).as_posix()[: -len(IMAGE_SUFFIX)]
            for p in split_dir.glob(f"*/*{IMAGE_SUFFIX}")
        )
        text, list_file = "".join(s + "\n" for s in stems), root / f"{split_dir.name}.txt"
        if list_file.exists():
            if list_file.read_text() != text:
                found = f"it is not the list of the {len(stems)} images found"
                log(f"kept {list_file}: {found}; remove it to have it written")
            continue
        with atomic_write(list_file) as temp:
            temp.write_text(text)


def convert_dataset(root, source="polygons", *, nproc=1, force=False, progress=True):
    """Converts every label file; returns the list of failures ('path: reason')."""
    root = Path(root)
    if not (root / "gtFine").is_dir() or not (root / "leftImg8bit").is_dir():
        raise DataError(
            f"{root}: expected gtFine/ and leftImg8bit/ inside; is this the Cityscapes root?"
        )
    if not os.access(root / "gtFine", os.W_OK) or not os.access(root, os.W_OK):
        raise DataError(
            f"{root}: not writable (a read-only mount?); the labels and split lists are written "
            "beside the data: convert a writable copy"
        )
    jobs = conversion_jobs(root, source, force=force)
    bar = tqdm(total=len(jobs), desc=f"labelTrainIds from {source}", disable=not progress)
    failures = []
    if nproc > 1 and len(jobs) > 1:
        with cli.process_pool(nproc) as pool:
            for failure in pool.imap_unordered(convert_one, jobs, chunksize=4):
                failures += [failure] if failure else []
                bar.update()
    else:
        for job in jobs:
            failure = convert_one(job)
            failures += [failure] if failure else []
            bar.update()
    bar.close()
    write_split_lists(root)
    return failures


def benchmark(root, nproc):
    """files/s of both sources on copies of the same labels, written to a temporary folder."""
    rates = {}
    for source in ("polygons", "labelIds"):
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [
                (src, Path(tmp) / f"{i}.png", source)
                for i, (src, _, _) in enumerate(conversion_jobs(root, source, force=True))
            ]
            if not jobs:
                raise DataError(f"{root}: no *{SOURCE_SUFFIX[source]} files to time")
            start = time.perf_counter()
            with cli.process_pool(nproc) as pool:
                list(pool.imap_unordered(convert_one, jobs, chunksize=4))
            rates[source] = len(jobs) / (time.perf_counter() - start)
        print(f"{source:>8}: {rates[source]:8.1f} files/s ({len(jobs)} files, {nproc} processes)")
    ratio = rates["labelIds"] / rates["polygons"]
    print(f"labelIds lookup table is {ratio:.1f}x faster than json2labelImg")
    per_s = {f"{source}_files_per_s": round(rate, 1) for source, rate in rates.items()}
    print(json.dumps({**per_s, "ratio": round(ratio, 2)}))


def run_conversion(argv):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("data_root")
    parser.add_argument("--nproc", type=cli.integer(1), default=1, help="parallel processes")
    parser.add_argument("--source", choices=("polygons", "labelIds"), default="polygons")
    parser.add_argument("--force", action="store_true", help="re-convert files that already exist")
    parser.add_argument("--benchmark", action="store_true", help="time both sources, write nothing")
    args = parser.parse_args(argv)
    if args.benchmark:
        benchmark(args.data_root, args.nproc)
        return
    failures = convert_dataset(args.data_root, args.source, nproc=args.nproc, force=args.force)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    print(json.dumps({"converted_ok": not failures, "failures": len(failures)}))
    sys.exit(1 if failures else 0)


def main(argv=None):
    cli.main(run_conversion, argv)


if __name__ == "__main__":
    main()
