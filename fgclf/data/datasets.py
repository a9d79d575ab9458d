"""Dataset sources (CUB layout, ImageFolder, HF ``datasets``) behind one record format.

Every source is read into :class:`Records` (paths or in-memory images, 0-based labels, image
ids, optional boxes, a split name per item), then split and wrapped in :class:`ImageDataset`.
Manifests are validated up front, so a bad line or a missing file stops a run before training
starts (a missing file is skipped like an unreadable image with ``data.skip_bad_images``).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from fgclf.errors import UserError

if TYPE_CHECKING:
    from fgclf.data.verified import VerifiedFiles

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@dataclass
class Records:
    """A dataset as flat lists: one entry per image.

    ``items`` are file paths (str) or, for HF datasets, integer row indices into ``source``.
    ``class_ids`` (CUB layout): the dataset's own id of each class, ``class_ids[label]`` (the
    ``classes.txt`` id; NABirds' are not ``1..N``), written to the run directory's ``splits.json``.
    ``levels``: coarser label levels, ``{level: (coarse class names, coarse label of each class)}``
    (Aircraft's family and manufacturer, NABirds' parent, Pets' species). ``format``: the reader
    that made them; ``notes``: lines for the user (auto's choice, a copy that differs from the
    official counts; :mod:`fgclf.data.formats`).
    """

    items: list
    labels: list[int]
    image_ids: list[str]
    splits: list[str]
    class_names: list[str]
    bboxes: Optional[list[Optional[tuple[float, float, float, float]]]] = None
    source: Any = None  # the HF dataset object for ``hf`` records
    class_ids: Optional[list[str]] = None
    levels: Optional[dict[str, tuple[list[str], list[int]]]] = None
    format: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def select(self, mask: Sequence[bool] | np.ndarray) -> "Records":
        """A new Records with only the entries where ``mask`` is true."""
        idx = np.flatnonzero(np.asarray(mask))
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, items=pick(self.items), labels=pick(self.labels), image_ids=pick(self.image_ids),
                       splits=pick(self.splits), bboxes=pick(self.bboxes))

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


def load_image(path: str, bbox: Optional[tuple[float, float, float, float]] = None,
               decoder: str = "pil") -> Image.Image:
    """Open ``path`` as RGB, optionally cropped to ``bbox`` = (x, y, width, height).

    ``decoder``: ``pil`` or ``torchvision`` (plain JPEGs through ``decode_jpeg``, the same
    pixels; see :mod:`fgclf.data.decode`).
    """
    from fgclf.data.decode import decode_file

    img = decode_file(path, decoder)
    if bbox is not None:
        x, y, w, h = bbox
        img = img.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))
    return img


MISSING_FILE = "missing file"  # the reason given for an image a manifest lists that is not on disk


@dataclass
class ImageInfo:
    """What decoding one image file found: its stored ``mode`` and ``size`` (width, height), or
    ``error`` (why it is unreadable); ``digest`` is a hash of the file's bytes when asked for."""

    mode: Optional[str] = None
    size: Optional[tuple[int, int]] = None
    error: Optional[str] = None
    digest: Optional[str] = None


def inspect_image(path: str, *, mode: str = "full", digest: bool = False) -> ImageInfo:
    """Open ``path`` as training would and report its mode and size, or why it fails.

    ``full`` decodes every pixel and converts the image to RGB (:func:`to_rgb`), so anything
    training would trip over is found here; ``header`` only parses the header (``verify``).
    A zero-byte file, a truncated image, a non-image with an image extension and a file that
    is not there (:data:`MISSING_FILE`) are errors.
    """
    info = ImageInfo()
    try:
        if digest or mode == "full":  # read once: hashed and decoded from memory
            with open(path, "rb") as f:
                data = f.read()
            if digest:
                info.digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            size, source = len(data), io.BytesIO(data)
        else:
            size, source = os.path.getsize(path), path
        if size == 0:
            info.error = "zero-byte file"
            return info
        with Image.open(source) as img:
            info.mode, info.size = img.mode, img.size
            if mode == "full":
                img.load()
                info.mode = img.mode
                to_rgb(img)
            else:
                img.verify()
    except FileNotFoundError:
        info.error = MISSING_FILE
    except Exception as err:  # PIL raises many types for bad files
        info.error = f"{type(err).__name__}: {err}".strip()
    return info


def _check_image(path: str, mode: str) -> Optional[str]:
    """Return why ``path`` is unreadable, or None when it decodes."""
    return inspect_image(path, mode=mode).error


def find_bad_images(paths: Sequence[str], *, mode: str = "full", workers: int = 4,
                    record: Optional["VerifiedFiles"] = None) -> list[tuple[str, str]]:
    """Decode (``full``) or open (``header``) every image; return ``[(path, reason), ...]``.

    ``none`` decodes nothing but still reports files that are not there (:data:`MISSING_FILE`):
    a missing file can never be trained on, and the check costs one ``stat`` per file.
    ``record`` (:class:`fgclf.data.verified.VerifiedFiles`): files it holds as unchanged since they
    passed are not decoded again, and the files that pass now are added to it.
    """
    if not paths:
        return []
    if mode == "none":
        return [(p, MISSING_FILE) for p in paths if not os.path.isfile(p)]
    todo = list(paths)
    if record is not None:
        known = record.passed(todo, mode)
        todo = [p for p in todo if p not in known]
        stamps = record.stamps(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: _check_image(p, mode), todo))
    if record is not None:
        record.add({p: stamps[p] for p, r in zip(todo, reasons) if r is None}, mode)
    return [(p, r) for p, r in zip(todo, reasons) if r is not None]


# ----------------------------------------------------------------------------- CUB layout
class _Table(dict):
    """``{id: [values]}`` of one manifest, with the file's ``name``, each id's ``line`` and the ids
    of lines that were refused (``rejected``, when problems are collected)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.line: dict[str, int] = {}
        self.rejected: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.name} line {self.line[key]}"


def _problem(problems: Optional[list[str]], message: str) -> None:
    """Raise ``message`` as a UserError, or, when ``problems`` collects them (the dataset check,
    which reports every problem in one pass), record it so the caller can go on without that line."""
    if problems is None:
        raise UserError(message)
    problems.append(message)


def _read_manifest_text(path: Path) -> str:
    """The text of a manifest: UTF-8 (with or without BOM) or UTF-16 with BOM; else a UserError."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # e.g. PowerShell's ``>`` redirection
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UserError(f"{path} starts like UTF-16 text but does not decode as UTF-16; save it as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path.name} line {line} is not UTF-8 text (byte 0x{data[err.start]:02x}); "
                        "save the file as UTF-8") from None


def _read_table(path: Path, ncols: int, problems: Optional[list[str]] = None) -> _Table:
    """Read ``id value...`` lines into {id: [values]}.

    Tolerated: a UTF-8 BOM (or UTF-16 with BOM), CRLF or CR line ends, blank lines, extra spaces
    or tabs between and around fields. The last column keeps inner spaces, so file names with
    spaces survive. A line with too few fields and a repeated id are UserErrors naming the line
    (with ``problems``: recorded there, the line left out). A missing or undecodable file is
    always a UserError.
    """
    if not path.is_file():
        raise UserError(f"missing manifest file {path}")
    table = _Table(path.name)
    for lineno, line in enumerate(re.split(r"\r\n|\r|\n", _read_manifest_text(path)), 1):
        line = line.lstrip("\ufeff")  # a BOM left inside by concatenating files
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=ncols - 1)
        if len(parts) != ncols:
            _problem(problems, f"{path.name} line {lineno}: expected {ncols} fields, got {line!r}")
            table.rejected.add(parts[0])
            continue
        if parts[0] in table:
            _problem(problems, f"{path.name} line {lineno}: duplicate id {parts[0]} "
                               f"(first on line {table.line[parts[0]]})")
            continue
        table[parts[0]] = parts[1:]
        table.line[parts[0]] = lineno
    return table


def read_cub_boxes(root: str | Path, problems: Optional[list[str]] = None) -> _Table:
    """``bounding_boxes.txt`` as {image id: (x, y, width, height)}; numbers and sizes checked
    (with ``problems``, a bad box is recorded there and its id is in ``rejected``)."""
    table = _read_table(Path(root) / "bounding_boxes.txt", 5, problems)
    boxes = _Table(table.name)
    boxes.line, boxes.rejected = table.line, table.rejected
    for image_id, values in table.items():
        try:
            box = tuple(float(v) for v in values)
        except ValueError:
            box = None
        if box is None:
            _problem(problems, f"{table.where(image_id)}: box {' '.join(values)!r} is not 4 numbers")
        elif not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
            _problem(problems, f"{table.where(image_id)}: box {' '.join(values)!r} needs a finite x, y and "
                               "a width and height > 0")
        else:
            boxes[image_id] = box
            continue
        boxes.rejected.add(image_id)
    return boxes


def _cub_classes(root: Path, classes: _Table, labels: _Table, images: _Table,
                 problems: Optional[list[str]]) -> tuple[list[str], list[str], dict[int, int], bool]:
    """``(class_names, class_ids, {classes.txt id: label}, numbered_1_to_n)`` of a CUB-layout folder.

    CUB numbers its classes 1..N: every line is a class and label = id - 1 (an unused one is then
    an empty class, refused later). NABirds' ``classes.txt`` lists every node of its hierarchy
    (ids not 1..N, a ``hierarchy.txt`` beside it): there the classes are the ids that
    ``image_class_labels.txt`` uses, numbered 0..N-1 in id order.
    """
    by_int: dict[int, str] = {}
    for class_id in classes:
        if not re.fullmatch(r"[0-9]+", class_id):
            _problem(problems, f"{classes.where(class_id)}: class id {class_id!r} is not a positive integer")
        elif int(class_id) in by_int:  # "7" and "07": the same class
            _problem(problems, f"{classes.where(class_id)}: class id {class_id} is also on line "
                               f"{classes.line[by_int[int(class_id)]]}")
        else:
            by_int[int(class_id)] = class_id
    numbered = sorted(by_int) == list(range(1, len(by_int) + 1)) and not (root / "hierarchy.txt").is_file()
    if numbered:
        used = sorted(by_int)
    else:  # images that name unknown classes are refused per image by read_cub
        used = sorted({int(v[0]) for i, v in labels.items()
                       if i in images and re.fullmatch(r"[0-9]+", v[0]) and int(v[0]) in by_int})
    class_ids = [by_int[c] for c in used]
    names = [classes[c][0] for c in class_ids]
    first: dict[str, str] = {}
    for c, name in zip(class_ids, names):
        if name in first:
            _problem(problems, f"{classes.where(c)}: class name {name!r} is also on line {classes.line[first[name]]}")
        first.setdefault(name, c)
    return names, class_ids, {c: k for k, c in enumerate(used)}, numbered


def _manifest_path(image_root: str, rel: str) -> Optional[str]:
    """``image_root/rel`` normalised, or None when ``rel`` is absolute or climbs out with ``..``.

    Checked on the text of the path, not on resolved links: an image that is a symlink to a
    file elsewhere (a dataset subset built from links) stays allowed.
    """
    if os.path.isabs(rel):
        return None
    joined = os.path.normpath(os.path.join(image_root, rel))
    if not joined.startswith(image_root + os.sep):
        return None
    if not os.path.isfile(joined):  # the same name in the other Unicode normal form (macOS copies)
        for form in ("NFC", "NFD"):
            alt = unicodedata.normalize(form, joined)
            if alt != joined and os.path.isfile(alt):
                return alt
    return joined


def _read_cub_manifests(root: Path, bbox_crop: bool, problems: Optional[list[str]]) -> tuple:
    """images, labels, splits, classes and (``bbox_crop``) boxes tables; a file that cannot be
    read at all is a UserError (with ``problems``: after reading the others, so all are named)."""
    out, fatal = [], []
    readers = [lambda n=n: _read_table(root / n, 2, problems)
               for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")]
    readers.append(lambda: read_cub_boxes(root, problems) if bbox_crop else None)
    for read in readers:
        try:
            out.append(read())
        except UserError as err:
            if problems is None:
                raise
            fatal.append(str(err))
            out.append(None)
    if out[0] is not None and not out[0]:
        fatal.append(f"{root / 'images.txt'} lists no images")
    if fatal:
        if problems is not None:
            problems.extend(fatal[:-1])
        raise UserError(fatal[-1])
    return tuple(out)


def read_cub(root: str | Path, *, bbox_crop: bool = False, keep_missing: bool = False,
             problems: Optional[list[str]] = None) -> Records:
    """Read a CUB-200-2011 style folder (``images.txt``, ``image_class_labels.txt``, ...).

    Files are joined on image id in any order; class ids are 1-based in the files and
    0-based in the returned labels (NABirds' non-contiguous ids: see :func:`_cub_classes`; the
    file's ids are kept in ``Records.class_ids``). Every id must be in every file (an id that
    is not in ``images.txt`` is an error too), image paths must stay inside ``images/`` and
    name existing files; errors name the file and line.

    Args:
        keep_missing: Keep images whose file is not there (the caller skips or names them as
            bad images, :func:`find_bad_images`) instead of a UserError counting them.
        problems: Collect every problem here instead of raising at the first; the images of
            bad lines are left out. A manifest that cannot be read at all still raises.
    """
    root = Path(root)
    images, labels, splits, classes, boxes = _read_cub_manifests(root, bbox_crop, problems)
    class_names, class_ids, label_of, numbered = _cub_classes(root, classes, labels, images, problems)
    tables = (labels, splits) + ((boxes,) if boxes is not None else ())
    image_root = os.path.abspath(root / "images")
    rec = Records([], [], [], [], class_names, [] if boxes is not None else None, class_ids=class_ids)
    missing = []
    for image_id in sorted(images, key=lambda s: (len(s), s)):
        absent = [t for t in tables if image_id not in t]
        for table in absent:
            if image_id not in table.rejected:  # else its own line was already named
                _problem(problems, f"image id {image_id} from images.txt is missing in {table.name}")
        if absent:
            continue
        rel = images[image_id][0]
        path = _manifest_path(image_root, rel)
        if path is None:
            _problem(problems, f"{images.where(image_id)}: id {image_id}: path {rel!r} leaves the dataset root "
                               f"(image paths must stay inside {image_root})")
            continue
        if not os.path.isfile(path):
            missing.append((image_id, path))
            if not keep_missing:
                continue
        label, is_train = labels[image_id][0], splits[image_id][0]
        if not re.fullmatch(r"-?[0-9]+", label):
            _problem(problems, f"{labels.where(image_id)}: class id {label!r} of image {image_id} is not an integer")
        elif int(label) not in label_of:
            _problem(problems, f"image id {image_id} has class {label}, outside 1..{len(class_names)} "
                               f"({labels.where(image_id)})" if numbered else
                               f"{labels.where(image_id)}: class id {label} of image {image_id} is not in classes.txt")
        elif is_train not in ("0", "1"):
            _problem(problems, f"{splits.where(image_id)}: is_training_image must be 1 or 0, got {is_train!r}")
        else:
            rec.items.append(str(Path(path).resolve()))
            rec.labels.append(label_of[int(label)])
            rec.image_ids.append(image_id)
            rec.splits.append("train" if is_train == "1" else "test")
            if boxes is not None:
                rec.bboxes.append(boxes[image_id])
    for table in tables:
        unknown = [i for i in table if i not in images]
        if unknown:
            more = f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""
            _problem(problems, f"{table.where(unknown[0])}: image id {unknown[0]} is not in images.txt{more}")
    if missing and not keep_missing:
        image_id, path = missing[0]
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        _problem(problems, f"images.txt id {image_id} names a missing file: {path}{more}; restore the files or "
                           "pass --data.skip_bad_images true to train without them")
    return rec


# ----------------------------------------------------------------------------- ImageFolder
def _is_image_file(path: Path, folder: Path) -> bool:
    """An image by its extension (as torchvision's ImageFolder), not hidden (``._x.jpg``,
    ``.ipynb_checkpoints/``): other files among the images are ignored."""
    return (path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _scan_class_folders(folder: Path) -> dict[str, list[str]]:
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = sorted(str(f) for f in sub.rglob("*") if _is_image_file(f, sub))
    return out


def read_imagefolder(root: str | Path) -> Records:
    """Read ``root/<class>/*`` or ``root/{train,val,test}/<class>/*``.

    Without split subfolders every image is labelled ``train`` (a test split is carved out
    later by :func:`fgclf.data.splits.assign_splits`). Only files with an image extension
    count (others are ignored); an empty class folder is still a class, so
    :func:`~fgclf.data.splits.assign_splits` refuses it.
    """
    root = Path(root)
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in root.iterdir()
                  if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
    per_split = ({s: _scan_class_folders(d) for s, d in split_dirs.items()} if split_dirs
                 else {"train": _scan_class_folders(root)})
    class_names = sorted({c for folders in per_split.values() for c in folders})
    if not class_names:
        raise UserError(f"no class subfolders found in {root}")
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
    if not Path(name_or_dir).is_dir():  # a hub dataset: the name is checked before any download
        from fgclf.models._factory import _check_repo_id

        _check_repo_id(name_or_dir, what="--data.root (no such folder, so a hub dataset name)")
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
    their resized cache entry, built on first use. ``decoder`` (``pil``, ``torchvision``)
    decodes the image files and the cache's entries (:mod:`fgclf.data.decode`).
    """

    def __init__(self, records: Records, transform: Optional[Callable] = None, cache=None,
                 decoder: str = "pil") -> None:
        from fgclf.data.decode import check_decoder

        self.records = records
        self.transform = transform
        self.cache = cache
        self.decoder = check_decoder(decoder)
        if self.decoder == "nvjpeg":  # train_classifier.py builds fgclf.data.device_input's datasets instead
            raise UserError("--data.decoder nvjpeg is train_classifier.py's GPU input path; this script decodes on "
                            "the CPU: use --data.decoder pil or torchvision")
        self.class_names = records.class_names
        self.targets = list(records.labels)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image:
        rec = self.records
        item = rec.items[index]
        bbox = rec.bboxes[index] if rec.bboxes is not None else None
        if isinstance(item, str):
            if self.cache is None:
                return load_image(item, bbox, self.decoder)
            return self.cache.load(item, bbox, decoder=self.decoder)
        return to_rgb(rec.source[int(item)]["image"])

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.records.labels[index]
