"""Whole-dataset check without training (``scripts/check_data.py``, ``train_classifier.py --check-data``).

:func:`check_dataset` parses the manifests with the same readers and split assignment as
training (so a manifest problem is the same one-line error, but every one is listed: the
images of bad lines are left out and the rest is still checked), decodes every image in parallel
threads (PIL releases the GIL while decoding) and returns a :class:`DataReport`: counts per
split and class, image sizes, the modes that get converted to RGB, unreadable images with the
reason, files listed twice or with identical content, classes without (train) images, and
bounding boxes that leave their image. :func:`run_check` prints it and returns the exit status.

What stops training is an *error* (exit status 2); the rest are warnings:

* errors: every manifest problem (bad line, duplicate or unknown id, path outside the root)
  and a config error; an unreadable image (corrupt, truncated, zero-byte, not an image, or
  listed but missing: ``missing file``), unless ``data.skip_bad_images`` (then a warning, as
  training then drops it); a class
  without images, or without train images (after dropping unreadable ones); no train or no
  test image; with ``data.bbox_crop``, a box that misses its image entirely.
* warnings: the same file listed under two ids, identical file content under two paths
  (called out when it spans train and val/test), boxes that extend past their image (the
  crop is padded with black), and boxes that miss the image when ``bbox_crop`` is off.
* information: images in modes other than RGB (L, P, RGBA, CMYK, I;16, ...), which are
  converted to RGB on load exactly as in training.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fgclf.data.datasets import ImageInfo, Records, inspect_image, read_cub_boxes, to_rgb
from fgclf.data.splits import class_coverage, empty_classes_message, not_in_train_message
from fgclf.errors import UserError

SPLITS = ("train", "val", "test")
MAX_LISTED = 20  # lines of one kind printed by format_report (the JSON report has them all)


@dataclass
class DataReport:
    """The result of :func:`check_dataset`; ``to_dict`` is the JSON report."""

    format: str
    root: Optional[str]
    num_images: int = 0
    class_names: list[str] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> images
    sizes: dict[str, list[int]] = field(default_factory=dict)  # width/height -> [min, median, max]
    modes: dict[str, int] = field(default_factory=dict)  # stored mode -> images (readable ones)
    converted: int = 0  # readable images not stored as RGB
    unreadable: list[dict] = field(default_factory=list)  # {id, path, split, reason}
    duplicate_paths: list[dict] = field(default_factory=list)  # {path, ids}
    identical_files: list[dict] = field(default_factory=list)  # {ids, paths, splits}
    boxes_outside: list[dict] = field(default_factory=list)  # {id, path, box, image_size, overlap}
    empty_classes: list[str] = field(default_factory=list)
    classes_missing_from_train: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    workers: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when training on this dataset (with these settings) can start."""
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def _median(values: list[int]) -> int:
    return int(np.median(values)) if values else 0


def _inspect_item(rec: Records, index: int, hash_files: bool) -> ImageInfo:
    item = rec.items[index]
    if isinstance(item, str):
        return inspect_image(item, mode="full", digest=hash_files)
    info = ImageInfo()  # an HF datasets row: decoded by datasets itself
    try:
        img = rec.source[int(item)]["image"]
        info.mode, info.size = img.mode, img.size
        to_rgb(img)
    except Exception as err:  # noqa: BLE001 - reported, not raised
        info.error = f"{type(err).__name__}: {err}".strip()
    return info


def _crop_box(box) -> tuple[int, int, int, int]:
    """The pixel rectangle :func:`fgclf.data.datasets.load_image` crops for ``box``."""
    x, y, w, h = box
    return int(x), int(y), int(round(x + w)), int(round(y + h))


def _boxes_for(rec: Records, root: Optional[str], fmt: str, bbox_crop: bool,
               warnings: list[str]) -> Optional[dict]:
    """id -> box: the records' own boxes (``bbox_crop``), else ``bounding_boxes.txt`` if there is one."""
    if rec.bboxes is not None:
        return dict(zip(rec.image_ids, rec.bboxes))
    if fmt not in ("cub", "toy") or root is None or not (Path(root) / "bounding_boxes.txt").is_file():
        return None
    problems: list[str] = []
    try:
        boxes = dict(read_cub_boxes(root, problems))
    except UserError as err:  # the file cannot be read at all
        problems.append(str(err))
        boxes = None
    warnings += [f"{p} (bounding boxes are not used: data.bbox_crop is false)" for p in problems]
    return boxes


def check_records(rec: Records, *, fmt: str = "", root: Optional[str] = None, bbox_crop: bool = False,
                  skip_bad_images: bool = False, workers: Optional[int] = None,
                  hash_files: bool = True) -> DataReport:
    """Decode every image of ``rec`` (split already assigned) and report on it; see the module doc."""
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    report = DataReport(format=fmt, root=root, num_images=len(rec), class_names=list(rec.class_names),
                        workers=workers)
    report.split_counts = {s: sum(1 for x in rec.splits if x == s) for s in SPLITS}
    counts = Counter(zip(rec.labels, rec.splits))
    report.class_counts = {name: {s: counts[(c, s)] for s in SPLITS} for c, name in enumerate(rec.class_names)}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = list(pool.map(lambda i: _inspect_item(rec, i, hash_files), range(len(rec))))
    report.seconds = round(time.perf_counter() - start, 3)

    readable = [i for i, info in enumerate(infos) if info.error is None]
    report.modes = dict(sorted(Counter(infos[i].mode for i in readable).items()))
    report.converted = sum(1 for i in readable if infos[i].mode != "RGB")
    widths = [infos[i].size[0] for i in readable]
    heights = [infos[i].size[1] for i in readable]
    if readable:
        report.sizes = {"width": [min(widths), _median(widths), max(widths)],
                        "height": [min(heights), _median(heights), max(heights)]}
    report.unreadable = [{"id": rec.image_ids[i], "path": str(rec.items[i]), "split": rec.splits[i],
                          "reason": info.error} for i, info in enumerate(infos) if info.error is not None]
    for bad in report.unreadable:
        line = f"unreadable image {bad['path']}: {bad['reason']}"
        (report.warnings if skip_bad_images else report.errors).append(line)
    if report.unreadable and skip_bad_images:
        report.warnings.append(f"{len(report.unreadable)} unreadable images will be skipped "
                               "(data.skip_bad_images is true)")

    _duplicates(rec, infos, report)
    boxes = _boxes_for(rec, root, fmt, bbox_crop, report.warnings)
    if boxes is not None:
        _check_boxes(rec, infos, boxes, bbox_crop, report)

    # what training would see: without the unreadable images when it skips them
    usable = rec.select([info.error is None for info in infos]) if skip_bad_images else rec
    empty, not_in_train = class_coverage(usable)
    report.empty_classes = [rec.class_names[c] for c in empty]
    report.classes_missing_from_train = [rec.class_names[c] for c in not_in_train]
    context = "after skipping the unreadable images: " if skip_bad_images and report.unreadable else ""
    if empty:
        report.errors.append(context + empty_classes_message(usable, empty))
    if not_in_train:
        report.errors.append(context + not_in_train_message(usable, not_in_train))
    if "train" not in usable.splits or "test" not in usable.splits:
        report.errors.append("the dataset needs at least one train and one test image "
                             f"(train {usable.splits.count('train')}, test {usable.splits.count('test')})")
    return report


def _duplicates(rec: Records, infos: list[ImageInfo], report: DataReport) -> None:
    by_path = defaultdict(list)
    for i, item in enumerate(rec.items):
        if isinstance(item, str):
            by_path[item].append(i)
    for path, idx in by_path.items():
        if len(idx) > 1:
            ids = [rec.image_ids[i] for i in idx]
            report.duplicate_paths.append({"path": path, "ids": ids})
            report.warnings.append(f"the same file is listed {len(idx)} times (ids {', '.join(ids)}): {path}")
    by_digest = defaultdict(list)
    for path, idx in by_path.items():
        digest = infos[idx[0]].digest
        if digest is not None:
            by_digest[digest].append(idx[0])
    for idx in by_digest.values():
        if len(idx) > 1:
            splits = sorted({rec.splits[i] for i in idx})
            entry = {"ids": [rec.image_ids[i] for i in idx], "paths": [str(rec.items[i]) for i in idx],
                     "splits": splits}
            report.identical_files.append(entry)
            leak = " (train and val/test share an image)" if "train" in splits and len(splits) > 1 else ""
            report.warnings.append(f"{len(idx)} files have identical content{leak}: {', '.join(entry['paths'])}")


def _check_boxes(rec: Records, infos: list[ImageInfo], boxes: dict, bbox_crop: bool, report: DataReport) -> None:
    past = 0
    for i, info in enumerate(infos):
        box = boxes.get(rec.image_ids[i])
        if box is None or info.size is None or info.error is not None:
            continue
        (x0, y0, x1, y1), (w, h) = _crop_box(box), info.size
        if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
            continue
        overlap = x0 < w and y0 < h and x1 > 0 and y1 > 0
        report.boxes_outside.append({"id": rec.image_ids[i], "path": str(rec.items[i]), "box": list(box),
                                     "image_size": [w, h], "overlap": overlap})
        if overlap:
            past += 1
        else:
            line = (f"bounding box {list(box)} of image id {rec.image_ids[i]} lies outside its {w}x{h} image "
                    f"{rec.items[i]}")
            if bbox_crop:
                report.errors.append(line + " (data.bbox_crop would train on an empty crop)")
            else:
                report.warnings.append(line + " (not used: data.bbox_crop is false)")
    if past:
        report.warnings.append(f"{past} bounding boxes extend past their image (the crop is padded with black); "
                               "listed under boxes_outside in the JSON report")


def check_dataset(data=None, *, workers: Optional[int] = None, hash_files: bool = True, **load_kwargs) -> DataReport:
    """Check a whole dataset: manifests, every image, classes and splits; never raises a UserError.

    Args:
        data: A :class:`fgclf.config.DataConfig` (its ``skip_bad_images`` decides whether an
            unreadable image is an error or a warning); or leave it None and pass the
            arguments of :func:`fgclf.data.load_records` (plus ``skip_bad_images``).
        workers: Decoding threads (None: CPU count + 4, at most 32).
        hash_files: Hash every file's bytes to find identical images under different names.

    Returns:
        The report. Manifest problems (the messages training raises, one per bad line) come
        first among its errors; when a manifest cannot be read at all they are its only errors.
    """
    from fgclf.data import load_kwargs_from_config, load_records

    if data is not None:
        kwargs, skip = load_kwargs_from_config(data), bool(data.skip_bad_images)
    else:
        kwargs = dict(load_kwargs)
        skip = bool(kwargs.pop("skip_bad_images", False))
    fmt, root = kwargs.get("format", "toy"), kwargs.get("root")
    problems: list[str] = []
    try:  # missing files are kept: decoding then reports each of them with the unreadable images
        rec = load_records(**kwargs, check_classes=False, keep_missing=True, problems=problems)
    except UserError as err:
        return DataReport(format=fmt, root=root, errors=[*problems, str(err)])
    if fmt == "toy":  # generated into the cache: report where
        from fgclf.data import ensure_toy_cub

        root = str(ensure_toy_cub(root, **(kwargs.get("toy_params") or {})))
    report = check_records(rec, fmt=rec.format or fmt, root=root, bbox_crop=kwargs.get("bbox_crop", False),
                           skip_bad_images=skip, workers=workers, hash_files=hash_files)
    report.errors[:0] = problems
    report.warnings[:0] = [n.removeprefix("warning: ") for n in rec.notes if n.startswith("warning: ")]
    if fmt == "auto":
        report.format = f"{rec.format} (auto)"
    return report


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _listed(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    more = [f"  ... and {len(lines) - MAX_LISTED} more (all in the JSON report)"] if len(lines) > MAX_LISTED else []
    return [f"{title} ({len(lines)}):", *[f"  {ln}" for ln in lines[:MAX_LISTED]], *more]


def format_report(report: DataReport) -> str:
    """The report as text: counts, per-class table, sizes, modes, problems, verdict."""
    out = [f"dataset: {report.format} {report.root or ''}".rstrip()]
    if report.num_images or report.class_names:
        s = report.split_counts
        out.append(f"images: {report.num_images} in {len(report.class_names)} classes; "
                   f"train {s.get('train', 0)}, val {s.get('val', 0)}, test {s.get('test', 0)}")
        rows = [["class", *SPLITS, "total"]] + [
            [name, *(str(c[sp]) for sp in SPLITS), str(sum(c.values()))] for name, c in report.class_counts.items()]
        out += ["per class:", *_table(rows)]
        if report.sizes:
            w, h = report.sizes["width"], report.sizes["height"]
            out.append(f"image size (min / median / max): width {w[0]} / {w[1]} / {w[2]}, "
                       f"height {h[0]} / {h[1]} / {h[2]}")
        if report.modes:
            out.append("modes: " + ", ".join(f"{m} {n}" for m, n in report.modes.items())
                       + (f" ({report.converted} converted to RGB on load)" if report.converted else ""))
        out.append(f"decoded {report.num_images} images in {report.seconds:.2f} s with {report.workers} threads")
        out += _listed("unreadable images", [f"{u['path']} (id {u['id']}, {u['split']}): {u['reason']}"
                                             for u in report.unreadable])
    unreadable = [e for e in report.errors if e.startswith("unreadable image ")]
    others = [e for e in report.errors if not e.startswith("unreadable image ")]
    out += _listed("warnings", [w for w in report.warnings if not w.startswith("unreadable image ")])
    out += _listed("errors", others + ([f"{len(unreadable)} unreadable images (listed above); fix or remove them, "
                                        "or pass --data.skip_bad_images true"] if unreadable else []))
    out.append("result: OK, the dataset is trainable" if report.ok
               else "result: NOT trainable (training would stop with these errors)")
    return "\n".join(out)


def run_check(data, *, workers: Optional[int] = None, output: Optional[str] = None,
              hash_files: bool = True) -> int:
    """Check ``data`` (a DataConfig), print the report, write it as JSON to ``output``.

    Each error also goes to stderr as one ``error: ...`` line. Returns the exit status:
    0 when the dataset is trainable, 2 when it is not.
    """
    report = check_dataset(data, workers=workers, hash_files=hash_files)
    if output:
        from fgclf.utils import atomic_write_text

        atomic_write_text(output, json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    print(format_report(report), flush=True)
    if output:
        print(f"report written to {output}")
    for line in report.errors[:MAX_LISTED]:
        print(f"error: {' '.join(line.split())}", file=sys.stderr)
    if len(report.errors) > MAX_LISTED:
        print(f"error: ... and {len(report.errors) - MAX_LISTED} more errors (see the report)", file=sys.stderr)
    sys.stderr.flush()
    return 0 if report.ok else 2


__all__ = ["DataReport", "check_dataset", "check_records", "format_report", "run_check"]
