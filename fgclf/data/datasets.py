"""Dataset sources (CUB layout, ImageFolder, HF ``datasets``) behind one record format.

Every source is read into :class:`Records` (paths or in-memory images, 0-based labels, image
ids, optional boxes, a split name per item), then split and wrapped in :class:`ImageDataset`.
Manifests are validated up front, so a missing file stops a run before training starts.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from fgclf.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@dataclass
class Records:
    """A dataset as flat lists: one entry per image.

    ``items`` are file paths (str) or, for HF datasets, integer row indices into ``source``.
    """

    items: list
    labels: list[int]
    image_ids: list[str]
    splits: list[str]
    class_names: list[str]
    bboxes: Optional[list[Optional[tuple[float, float, float, float]]]] = None
    source: Any = None  # the HF dataset object for ``hf`` records

    def select(self, mask: Sequence[bool] | np.ndarray) -> "Records":
        """A new Records with only the entries where ``mask`` is true."""
        idx = np.flatnonzero(np.asarray(mask))
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Records(pick(self.items), pick(self.labels), pick(self.image_ids), pick(self.splits),
                       self.class_names, pick(self.bboxes), self.source)

    def split(self, name: str) -> "Records":
        return self.select([s == name for s in self.splits])

    def __len__(self) -> int:
        return len(self.items)


# ----------------------------------------------------------------------------- image decoding
def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map high-bit-depth or float pixels to 0..255 by the range they are stored in.

    Data already in 0..255 is kept; 16-bit data is divided by 257 (65535 -> 255); floats in
    0..1 are multiplied by 255; anything else is stretched from its own min..max.
    """
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 1.0 and arr.dtype.kind == "f":
        arr = arr * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        arr = arr / 257.0
    else:
        arr = (arr - lo) / (hi - lo) * 255.0
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to 8-bit RGB.

    Transparent images are composited on white; 16/32-bit and float images are scaled by
    :func:`_scale_to_uint8` (a plain ``convert("RGB")`` would clip them to white).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        return Image.fromarray(_scale_to_uint8(arr), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str, bbox: Optional[tuple[float, float, float, float]] = None) -> Image.Image:
    """Open ``path`` as RGB, optionally cropped to ``bbox`` = (x, y, width, height)."""
    with Image.open(path) as img:
        img.load()
        img = to_rgb(img)
    if bbox is not None:
        x, y, w, h = bbox
        img = img.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))
    return img


def _check_image(path: str, mode: str) -> Optional[str]:
    """Return why ``path`` is unreadable, or None when it decodes."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file"
        with Image.open(path) as img:
            if mode == "full":
                img.load()
            else:
                img.verify()
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}".strip()
    return None


def find_bad_images(paths: Sequence[str], *, mode: str = "full", workers: int = 4) -> list[tuple[str, str]]:
    """Decode (``full``) or open (``header``) every image; return ``[(path, reason), ...]``."""
    if mode == "none" or not paths:
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: _check_image(p, mode), paths, chunksize=32))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


# ----------------------------------------------------------------------------- CUB layout
def _read_table(path: Path, ncols: int) -> dict[str, list[str]]:
    """Read ``id value...`` lines (BOM, CRLF, blank lines tolerated) into {id: [values]}.

    The last column keeps inner spaces, so file names with spaces survive.
    """
    if not path.is_file():
        raise UserError(f"missing manifest file {path}")
    table: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=ncols - 1)
        if len(parts) != ncols:
            raise UserError(f"{path.name} line {lineno}: expected {ncols} fields, got {line!r}")
        if parts[0] in table:
            raise UserError(f"{path.name} line {lineno}: duplicate id {parts[0]}")
        table[parts[0]] = parts[1:]
    return table


def read_cub(root: str | Path, *, bbox_crop: bool = False) -> Records:
    """Read a CUB-200-2011 style folder (``images.txt``, ``image_class_labels.txt``, ...).

    Files are joined on image id in any order; class ids are 1-based in the files and
    0-based in the returned labels.
    """
    root = Path(root)
    images = _read_table(root / "images.txt", 2)
    labels = _read_table(root / "image_class_labels.txt", 2)
    splits = _read_table(root / "train_test_split.txt", 2)
    classes = _read_table(root / "classes.txt", 2)
    boxes = _read_table(root / "bounding_boxes.txt", 5) if bbox_crop else None
    class_ids = sorted(classes, key=int)
    if [int(c) for c in class_ids] != list(range(1, len(class_ids) + 1)):
        raise UserError(f"classes.txt must number classes 1..N, got ids {class_ids[:5]}...")
    class_names = [classes[c][0] for c in class_ids]
    image_root = (root / "images").resolve()
    rec = Records([], [], [], [], class_names, [] if boxes is not None else None)
    for image_id in sorted(images, key=lambda s: (len(s), s)):
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", splits)) + (
                (("bounding_boxes.txt", boxes),) if boxes is not None else ()):
            if image_id not in table:
                raise UserError(f"image id {image_id} from images.txt is missing in {name}")
        path = (image_root / images[image_id][0]).resolve()
        if image_root not in path.parents:
            raise UserError(f"images.txt id {image_id}: path {images[image_id][0]!r} leaves the dataset root")
        if not path.is_file():
            raise UserError(f"images.txt id {image_id} names a missing file: {path}")
        label = int(labels[image_id][0])
        if not 1 <= label <= len(class_names):
            raise UserError(f"image id {image_id} has class {label}, outside 1..{len(class_names)}")
        rec.items.append(str(path))
        rec.labels.append(label - 1)
        rec.image_ids.append(image_id)
        rec.splits.append("train" if splits[image_id][0] == "1" else "test")
        if boxes is not None:
            rec.bboxes.append(tuple(float(v) for v in boxes[image_id]))
    return rec


# ----------------------------------------------------------------------------- ImageFolder
def _scan_class_folders(folder: Path) -> dict[str, list[str]]:
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(f) for f in sub.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        out[sub.name] = files
    return out


def read_imagefolder(root: str | Path) -> Records:
    """Read ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``.

    Without split subfolders every image is labelled ``train`` (a test split is carved out
    later by :func:`fgclf.data.splits.assign_splits`).
    """
    root = Path(root)
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in root.iterdir()
                  if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
    per_split = ({s: _scan_class_folders(d) for s, d in split_dirs.items()} if split_dirs
                 else {"train": _scan_class_folders(root)})
    class_names = sorted({c for folders in per_split.values() for c in folders})
    if not class_names:
        raise UserError(f"no class subfolders found in {root}")
    if "train" in per_split:
        missing = [c for c in class_names if not per_split["train"].get(c)]
        if missing:
            raise UserError(f"classes with no training images in {root}: {', '.join(missing[:5])}")
    index = {c: i for i, c in enumerate(class_names)}
    rec = Records([], [], [], [], class_names)
    for split, folders in per_split.items():
        for cname, files in folders.items():
            for f in files:
                rec.items.append(f)
                rec.labels.append(index[cname])
                rec.image_ids.append(os.path.relpath(f, root))
                rec.splits.append(split)
    if not rec.items:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) found under {root}")
    return rec


# ----------------------------------------------------------------------------- HF datasets
def read_hf(name_or_dir: str) -> Records:
    """Load an HF ``datasets`` dataset: a local ``imagefolder`` directory or a hub name."""
    try:
        import datasets
    except ImportError:
        raise UserError("data.format=hf needs the 'datasets' package: pip install 'fgclf[hf]'") from None
    try:
        if Path(name_or_dir).is_dir():
            dsd = datasets.load_dataset("imagefolder", data_dir=name_or_dir)
        else:
            dsd = datasets.load_dataset(name_or_dir)
    except Exception as err:
        raise UserError(f"could not load HF dataset {name_or_dir!r} ({type(err).__name__}: {err})") from None
    image_col = next((c for c in ("image", "img", "pixel_values") if c in dsd[next(iter(dsd))].column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in dsd[next(iter(dsd))].column_names), None)
    if image_col is None or label_col is None:
        raise UserError(f"HF dataset {name_or_dir!r} needs an image and a label column")
    first = dsd[next(iter(dsd))]
    names = getattr(first.features[label_col], "names", None)
    if names:  # a ClassLabel: its integer ids are the labels
        class_names, to_index = list(names), int
    else:  # plain values (strings, or ints not numbered 0..N-1): sorted by value, then numbered
        values = sorted({v for ds in dsd.values() for v in ds[label_col]})
        index = {v: i for i, v in enumerate(values)}
        class_names, to_index = [str(v) for v in values], index.__getitem__
    # one concatenated table with a split column, so items are row indices
    parts, rec = [], Records([], [], [], [], class_names)
    offset = 0
    for split_name, ds in dsd.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is None:
            continue
        parts.append(ds.select_columns([image_col, label_col]).rename_columns(
            {image_col: "image", label_col: "label"}))
        for i, label in enumerate(ds[label_col]):
            rec.items.append(offset + i)
            rec.labels.append(to_index(label))
            rec.image_ids.append(f"{split_name}/{i}")
            rec.splits.append(split)
        offset += len(ds)
    rec.source = datasets.concatenate_datasets(parts)
    return rec


# ----------------------------------------------------------------------------- torch dataset
class ImageDataset:
    """A map-style dataset over :class:`Records`: returns ``(transform(image), label)``.

    With ``cache`` (a :class:`fgclf.data.cache.ResizedImageCache`) image files are read from
    their resized cache entry, built on first use.
    """

    def __init__(self, records: Records, transform: Optional[Callable] = None, cache=None) -> None:
        self.records = records
        self.transform = transform
        self.cache = cache
        self.class_names = records.class_names
        self.targets = list(records.labels)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image:
        rec = self.records
        item = rec.items[index]
        bbox = rec.bboxes[index] if rec.bboxes is not None else None
        if isinstance(item, str):
            return load_image(item, bbox) if self.cache is None else self.cache.load(item, bbox)
        return to_rgb(rec.source[int(item)]["image"])

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.records.labels[index]
