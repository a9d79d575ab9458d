"""The fine-grained datasets in the layouts their authors ship, checked against the official counts.

One reader per layout, registered by name (``--data.format``, :func:`list_formats`):

============== ===================================================================== =========
format         files read (found anywhere up to three folders below ``--data.root``)   boxes
============== ===================================================================== =========
cub            ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``    yes
nabirds        the CUB files plus ``hierarchy.txt`` (non-contiguous class ids)        yes
stanford_cars  ``devkit/cars_meta.mat``, ``cars_train_annos.mat``,                    yes
               ``cars_test_annos_withlabels.mat`` (any folder; nested
               ``cars_train/cars_train`` mirrors), or ``cars_annos.mat`` + ``car_ims/``
fgvc_aircraft  ``data/images_{variant,family,manufacturer}_{train,val,test}.txt``     yes
stanford_dogs  ``train_list.mat``, ``test_list.mat`` (in ``lists/`` or not), ``Images/``, yes
               ``Annotation/`` (boxes, read only for ``bbox_crop``)
flowers102     ``imagelabels.mat``, ``setid.mat``, ``jpg/``                           no
oxford_pets    ``annotations/trainval.txt``, ``annotations/test.txt``, ``images/``    no
============== ===================================================================== =========

``auto`` picks the reader from the files present (:func:`detect_format`) and says which.
Every reader returns :class:`~fgclf.data.datasets.Records` with the dataset's official splits
(``train``/``test``; Aircraft and Flowers-102 also ``val``), 0-based labels, class names and,
where the dataset has them, boxes ``(x, y, width, height)`` in 0-based pixels and coarser label
levels (``Records.levels``). :func:`official_count_notes` compares a copy with the published
protocol (:data:`OFFICIAL_COUNTS`) and names any difference in one line (not for the embedded
toy dataset, which is CUB-shaped but not CUB).

``.mat`` files are read with scipy. torchvision has readers for Cars, Aircraft, Flowers and Pets,
but each wants its own folder name under ``root`` (``stanford_cars/``, ``fgvc-aircraft-2013b/``,
...) and none reads the older Cars layout or a mirror's nesting, so the readers here are our own;
the Flowers-102 class names (which the dataset does not ship) come from torchvision's list.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from fgclf.data.datasets import Records, read_cub, read_imagefolder
from fgclf.errors import UserError

# the published protocol of each dataset: images per split and classes (per label level)
OFFICIAL_COUNTS: dict[str, dict] = {
    "cub": {"splits": {"train": 5994, "test": 5794}, "classes": 200},
    "nabirds": {"splits": {"train": 23929, "test": 24633}, "classes": 555},
    "stanford_cars": {"splits": {"train": 8144, "test": 8041}, "classes": 196},
    "fgvc_aircraft": {"splits": {"train": 3334, "val": 3333, "test": 3333},
                      "classes": {"variant": 100, "family": 70, "manufacturer": 30}},
    "stanford_dogs": {"splits": {"train": 12000, "test": 8580}, "classes": 120},
    "flowers102": {"splits": {"train": 1020, "val": 1020, "test": 6149}, "classes": 102},
    "oxford_pets": {"splits": {"train": 3680, "test": 3669}, "classes": 37},
}
AIRCRAFT_LEVELS = ("variant", "family", "manufacturer")
_SKIP_DIRS = {"images", "Images", "jpg", "car_ims", "cars_train", "cars_test", "Annotation", "trimaps", "xmls",
              "segmentations", "attributes", "parts", "__MACOSX"}


# ----------------------------------------------------------------------------- finding files
def _walk(root: Path, depth: int = 3):
    """Folders under ``root`` (itself first), breadth first, at most ``depth`` levels down; image
    folders (thousands of files, never a manifest) are not entered."""
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for folder in level:
            yield folder
            try:
                subs = sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
            except OSError:
                continue
            nxt += [Path(s) for s in subs if Path(s).name not in _SKIP_DIRS]
        level = nxt


def find_file(root: str | Path, name: str, *, parent: Optional[str] = None, depth: int = 3) -> Optional[Path]:
    """The shallowest ``name`` (a file name or a glob pattern) under ``root`` (in a folder called
    ``parent`` when given), or None."""
    for folder in _walk(Path(root), depth):
        if parent is not None and folder.name != parent:
            continue
        if any(c in name for c in "*?["):  # a pattern: the first match by name
            found = sorted(p for p in folder.glob(name) if p.is_file())
            if found:
                return found[0]
        elif (folder / name).is_file():
            return folder / name
    return None


def _require(root: Path, name: str, fmt: str, *, parent: Optional[str] = None, near: Optional[Path] = None) -> Path:
    """:func:`find_file` (first beside ``near``), else a UserError naming the file."""
    if near is not None and (near / name).is_file():
        return near / name
    found = find_file(root, name, parent=parent)
    if found is None:
        where = f"{parent}/{name}" if parent else name
        raise UserError(f"data.format={fmt}: missing annotation file {where} (looked in {root} and three folders "
                        "below it)")
    return found


def _image_dir(root: Path, name: str, first_file: str, fmt: str, near: Optional[Path] = None) -> Path:
    """The folder called ``name`` that holds ``first_file`` (a mirror may nest ``x/x``)."""
    candidates = [near / name] if near is not None else []
    for folder in _walk(root, 3):
        candidates += [folder / name, folder / name / name]
    for cand in candidates:
        if (cand / first_file).is_file():
            return cand
    for cand in candidates:  # no file there: a partial copy; the missing files are reported per image
        if cand.is_dir():
            return cand
    raise UserError(f"data.format={fmt}: no image folder {name}/ with {first_file} under {root}")


def _loadmat(path: Path):
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise UserError("reading .mat annotation files needs scipy: pip install scipy") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err})") from None


def _mat_field(mat, key: str, path: Path):
    if key not in mat:
        raise UserError(f"{path.name} has no '{key}' entry (found {', '.join(k for k in mat if not k.startswith('__'))})")
    return mat[key]


def _mat_list(mat, key: str, path: Path, kind: type = str) -> list:
    """A cell array or vector of a ``.mat`` file as a non-empty list of ``kind`` (``squeeze_me``
    turns a one-entry cell into a bare string and a one-entry vector into a number: both handled)."""
    import numpy as np

    values = np.atleast_1d(np.asarray(_mat_field(mat, key, path), dtype=object)).ravel().tolist()
    if not values:
        raise UserError(f"{path.name}: '{key}' is empty")
    try:
        return [kind(v) if kind is not int else int(float(v)) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{path.name}: '{key}' holds a value that is not {kind.__name__} ({values[0]!r}, ...)") from None


def _column(records, field: str, path: Path) -> list:
    """One field of a MATLAB struct array (``annotations``) as a list; a UserError if absent."""
    names = getattr(getattr(records, "dtype", None), "names", None) or ()
    if not names:
        raise UserError(f"{path.name}: the annotations are not a struct array with named fields")
    if records.size == 0:
        raise UserError(f"{path.name}: the annotations list no images")
    if field not in names:
        raise UserError(f"{path.name}: the annotations have no '{field}' field (found {', '.join(names)})")
    return [records[field].item()] if records.ndim == 0 else list(records[field].ravel())


# ----------------------------------------------------------------------------- building records
class _Builder:
    """Collects images; files that are not there are kept (``keep_missing``) or named in one error."""

    def __init__(self, fmt: str, class_names: list[str], *, boxes: bool, keep_missing: bool) -> None:
        self.fmt, self.keep_missing = fmt, keep_missing
        self.rec = Records([], [], [], [], list(class_names), [] if boxes else None)
        self.missing: list[str] = []

    def add(self, path: Path, label: int, image_id: str, split: str, box=None) -> None:
        path_s = str(path)
        if not os.path.isfile(path_s):
            self.missing.append(path_s)
            if not self.keep_missing:
                return
        rec = self.rec
        rec.items.append(str(Path(path_s).resolve()) if os.path.isfile(path_s) else os.path.abspath(path_s))
        rec.labels.append(label)
        rec.image_ids.append(image_id)
        rec.splits.append(split)
        if rec.bboxes is not None:
            rec.bboxes.append(box)

    def done(self) -> Records:
        if self.missing and not self.keep_missing:
            more = f" (and {len(self.missing) - 1} more missing files)" if len(self.missing) > 1 else ""
            raise UserError(f"data.format={self.fmt}: a listed image is missing: {self.missing[0]}{more}; restore the "
                            "files or pass --data.skip_bad_images true to train without them")
        if not self.rec.items:
            raise UserError(f"data.format={self.fmt}: the annotation files list no images")
        self.rec.format = self.fmt
        return self.rec


def _box_from_corners(x1: float, y1: float, x2: float, y2: float) -> Optional[tuple]:
    """1-based inclusive corners (MATLAB, VOC) as a 0-based ``(x, y, width, height)``; None if empty."""
    box = (float(x1) - 1.0, float(y1) - 1.0, float(x2) - float(x1) + 1.0, float(y2) - float(y1) + 1.0)
    return box if box[2] > 0 and box[3] > 0 else None


def _label(value, n: int, where: str) -> int:
    """A 1-based class number from an annotation file as a 0-based label."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: class {value!r} is not an integer") from None
    if not 1 <= k <= n:
        raise UserError(f"{where}: class {k} is outside 1..{n}")
    return k - 1


# ----------------------------------------------------------------------------- CUB and NABirds
def _cub_root(root: Path, fmt: str) -> Path:
    if (root / "images.txt").is_file():
        return root
    return _require(root, "images.txt", fmt).parent


def read_nabirds(root: str | Path, *, bbox_crop: bool = False, keep_missing: bool = False,
                 problems: Optional[list[str]] = None) -> Records:
    """NABirds: the CUB layout with ``hierarchy.txt`` (``child parent`` class ids); the classes are
    the 555 ids images use, numbered in id order (:func:`~fgclf.data.datasets.read_cub`), and
    ``Records.levels["parent"]`` maps each to its parent node in ``hierarchy.txt``. That node is
    not one taxonomic rank: a sex or morph leaf's parent is its species, a species leaf's parent
    a higher group."""
    base = _cub_root(Path(root), "nabirds")
    hierarchy = base / "hierarchy.txt"
    if not hierarchy.is_file():
        raise UserError(f"data.format=nabirds: missing annotation file {hierarchy}")
    rec = read_cub(base, bbox_crop=bbox_crop, keep_missing=keep_missing, problems=problems)
    parent_of: dict[str, str] = {}
    for lineno, line in enumerate(hierarchy.read_text(encoding="utf-8-sig").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UserError(f"hierarchy.txt line {lineno}: expected 'child_id parent_id', got {line!r}")
        parent_of[str(int(parts[0]))] = str(int(parts[1]))
    names = {}
    for line in (base / "classes.txt").read_text(encoding="utf-8-sig").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():  # read_cub has named any other line
            names[str(int(parts[0]))] = parts[1]
    ids = [str(int(c)) for c in rec.class_ids or []]
    no_parent = [i for i in ids if i not in parent_of]
    if no_parent:
        raise UserError(f"hierarchy.txt: class {no_parent[0]} has no parent line")
    parents = sorted({parent_of[i] for i in ids}, key=int)
    index = {p: k for k, p in enumerate(parents)}
    rec.levels = {"parent": ([names.get(p, p) for p in parents], [index[parent_of[i]] for i in ids])}
    rec.format = "nabirds"
    return rec


def _read_cub_anywhere(root, bbox_crop, keep, problems) -> Records:
    rec = read_cub(_cub_root(Path(root), "cub"), bbox_crop=bbox_crop, keep_missing=keep, problems=problems)
    rec.format = "cub"
    return rec


# ----------------------------------------------------------------------------- Stanford Cars
def read_stanford_cars(root: str | Path, *, bbox_crop: bool = False, keep_missing: bool = False) -> Records:
    """Stanford Cars (Krause et al. 2013), 196 classes, 8,144 train / 8,041 test.

    The devkit layout (``devkit/cars_meta.mat``, ``cars_train_annos.mat``, the test labels in
    ``cars_test_annos_withlabels.mat`` published after the devkit; images in ``cars_train/``,
    ``cars_test/``, also nested as mirrors ship them) or the older one (``cars_annos.mat`` with
    a ``test`` flag per image, images in ``car_ims/``). Boxes: the annotations' corners.
    """
    root = Path(root)
    meta = find_file(root, "cars_meta.mat")
    if meta is None and find_file(root, "cars_annos.mat") is not None:
        return _read_cars_single_file(root, find_file(root, "cars_annos.mat"), bbox_crop, keep_missing)
    meta = _require(root, "cars_meta.mat", "stanford_cars")
    class_names = _mat_list(_loadmat(meta), "class_names", meta)
    out = _Builder("stanford_cars", class_names, boxes=bbox_crop, keep_missing=keep_missing)
    train = _require(root, "cars_train_annos.mat", "stanford_cars", near=meta.parent)
    test = find_file(root, "cars_test_annos_withlabels*.mat")  # mirrors: "cars_test_annos_withlabels (1).mat"
    if test is None:
        raise UserError("data.format=stanford_cars: missing annotation file cars_test_annos_withlabels.mat (the "
                        "test labels, published apart from the devkit, whose cars_test_annos.mat has none)")
    for split, path, folder in (("train", train, "cars_train"), ("test", test, "cars_test")):
        annos = _mat_field(_loadmat(path), "annotations", path)
        fnames = [str(f) for f in _column(annos, "fname", path)]
        classes = _column(annos, "class", path)
        corners = [_column(annos, f"bbox_{k}", path) for k in ("x1", "y1", "x2", "y2")]
        images = _image_dir(root, folder, fnames[0], "stanford_cars")
        for k, fname in enumerate(fnames):
            label = _label(classes[k], len(class_names), f"{path.name} entry {k + 1}")
            box = _box_from_corners(*(c[k] for c in corners)) if bbox_crop else None
            out.add(images / fname, label, f"{split}/{fname}", split, box)
    return out.done()


def _read_cars_single_file(root: Path, path: Path, bbox_crop: bool, keep_missing: bool) -> Records:
    mat = _loadmat(path)
    class_names = _mat_list(mat, "class_names", path)
    annos = _mat_field(mat, "annotations", path)
    rel = [str(p) for p in _column(annos, "relative_im_path", path)]
    classes, is_test = _column(annos, "class", path), _column(annos, "test", path)
    corners = [_column(annos, f"bbox_{k}", path) for k in ("x1", "y1", "x2", "y2")]
    out = _Builder("stanford_cars", class_names, boxes=bbox_crop, keep_missing=keep_missing)
    first = Path(rel[0])  # "car_ims/000001.jpg": find the folder that holds it
    images = _image_dir(root, first.parts[0], str(Path(*first.parts[1:])), "stanford_cars", near=path.parent)
    for k, r in enumerate(rel):
        label = _label(classes[k], len(class_names), f"{path.name} entry {k + 1}")
        box = _box_from_corners(*(c[k] for c in corners)) if bbox_crop else None
        split = "test" if int(is_test[k]) else "train"
        out.add(images / Path(*Path(r).parts[1:]), label, r, split, box)
    return out.done()


# ----------------------------------------------------------------------------- FGVC-Aircraft
def _read_lines(path: Path) -> list[tuple[str, str]]:
    """``id name`` lines (the name may hold spaces)."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2:
            raise UserError(f"{path.name} line {lineno}: expected 'image_id name', got {line!r}")
        out.append((parts[0], parts[1].strip()))
    return out


def read_fgvc_aircraft(root: str | Path, *, label_level: Optional[str] = None, bbox_crop: bool = False,
                       keep_missing: bool = False) -> Records:
    """FGVC-Aircraft 2013b (Maji et al. 2013): 3,334 train / 3,333 val / 3,333 test images of 100
    variants, 70 families, 30 manufacturers. ``label_level`` (default ``variant``) picks the
    classes; the coarser levels are in ``Records.levels``. The standard protocol trains on
    train+val (``--data.merge_val true``) and reports test. Boxes: ``images_box.txt``.
    The images keep their 20-pixel copyright banner at the bottom, as the official splits do.
    """
    level = label_level or "variant"
    if level not in AIRCRAFT_LEVELS:
        raise UserError(f"data.label_level must be one of {', '.join(AIRCRAFT_LEVELS)} for fgvc_aircraft, got {level!r}")
    root = Path(root)
    data = _require(root, "images_variant_test.txt", "fgvc_aircraft").parent
    per_level: dict[str, dict[str, str]] = {lv: {} for lv in AIRCRAFT_LEVELS}
    split_of: dict[str, str] = {}
    for lv in AIRCRAFT_LEVELS:
        for split in ("train", "val", "test"):
            path = _require(root, f"images_{lv}_{split}.txt", "fgvc_aircraft", near=data)
            for image_id, name in _read_lines(path):
                per_level[lv][image_id] = name
                if lv == "variant":
                    split_of[image_id] = split
    for lv in ("family", "manufacturer"):
        absent = [i for i in split_of if i not in per_level[lv]]
        if absent:
            raise UserError(f"fgvc_aircraft: image {absent[0]} has a variant but no {lv} label "
                            f"(images_{lv}_*.txt, {len(absent)} images)")

    def names_of(lv: str) -> list[str]:
        listed = data / {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}[lv]
        used = set(per_level[lv].values())
        if listed.is_file():
            names = [ln.strip() for ln in listed.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
            unknown = sorted(used - set(names))
            if unknown:
                raise UserError(f"{listed.name}: does not list the class {unknown[0]!r} that the images use")
            return names
        return sorted(used)

    names = {lv: names_of(lv) for lv in AIRCRAFT_LEVELS}
    index = {lv: {n: k for k, n in enumerate(names[lv])} for lv in AIRCRAFT_LEVELS}
    boxes = {}
    if bbox_crop:
        box_file = _require(root, "images_box.txt", "fgvc_aircraft", near=data)
        for image_id, rest in _read_lines(box_file):
            try:
                boxes[image_id] = _box_from_corners(*(float(v) for v in rest.split()))
            except (TypeError, ValueError):
                raise UserError(f"{box_file.name}: image {image_id}: expected 'xmin ymin xmax ymax', got {rest!r}") from None
    out = _Builder("fgvc_aircraft", names[level], boxes=bbox_crop, keep_missing=keep_missing)
    images = data / "images"
    for image_id in sorted(split_of):
        out.add(images / f"{image_id}.jpg", index[level][per_level[level][image_id]], image_id, split_of[image_id],
                boxes.get(image_id))
    rec = out.done()
    # coarser levels: each class of the chosen level maps to one class of every coarser level
    rec.levels = {}
    for lv in AIRCRAFT_LEVELS[AIRCRAFT_LEVELS.index(level) + 1:]:
        coarse: dict[int, set[int]] = {}
        for image_id in split_of:
            coarse.setdefault(index[level][per_level[level][image_id]], set()).add(index[lv][per_level[lv][image_id]])
        split_classes = [c for c, s in coarse.items() if len(s) > 1]
        if split_classes:
            raise UserError(f"fgvc_aircraft: {level} {names[level][split_classes[0]]!r} has images in several {lv} "
                            "classes; the levels are not a hierarchy in this copy")
        rec.levels[lv] = (names[lv], [min(coarse.get(c, {-1})) for c in range(len(names[level]))])
    return rec


# ----------------------------------------------------------------------------- Stanford Dogs
def _dog_box(path: Path) -> Optional[tuple]:
    """The union of the ``<object><bndbox>`` boxes of one PASCAL VOC annotation file."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as err:
        raise UserError(f"cannot read the box annotation {path} ({type(err).__name__}: {err})") from None
    corners = []
    for box in tree.getroot().iter("bndbox"):
        try:
            corners.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (TypeError, ValueError):
            raise UserError(f"{path}: a <bndbox> without numeric xmin, ymin, xmax, ymax") from None
    if not corners:
        return None
    return _box_from_corners(min(c[0] for c in corners), min(c[1] for c in corners),
                             max(c[2] for c in corners), max(c[3] for c in corners))


def read_stanford_dogs(root: str | Path, *, bbox_crop: bool = False, keep_missing: bool = False) -> Records:
    """Stanford Dogs (Khosla et al. 2011): 120 breeds, 12,000 train / 8,580 test, from
    ``lists/{train,test}_list.mat`` (1-based labels; images under ``Images/``). Boxes, read only
    for ``bbox_crop``: the union of the dogs in each ``Annotation/`` file."""
    root = Path(root)
    train = _require(root, "train_list.mat", "stanford_dogs")
    test = _require(root, "test_list.mat", "stanford_dogs", near=train.parent)
    lists = {}
    for split, path in (("train", train), ("test", test)):
        mat = _loadmat(path)
        files = _mat_list(mat, "file_list", path)
        labels = _mat_list(mat, "labels", path, int)
        annos = _mat_list(mat, "annotation_list", path) if "annotation_list" in mat else [f[:-4] for f in files]
        if not len(files) == len(labels) == len(annos):
            raise UserError(f"{path.name}: {len(files)} files, {len(labels)} labels and {len(annos)} annotations")
        lists[split] = (files, labels, annos, path)
    names: dict[int, str] = {}
    for files, labels, _, _ in lists.values():
        for f, k in zip(files, labels):
            names.setdefault(k, f.split("/")[0].split("-", 1)[-1])
    n = max(names)
    if sorted(names) != list(range(1, n + 1)):
        gaps = sorted(set(range(1, n + 1)) - set(names))
        raise UserError(f"stanford_dogs: labels 1..{n} expected in the lists, {len(gaps)} missing (first {gaps[0]})")
    class_names = [names[k] for k in range(1, n + 1)]
    home = train.parent.parent if train.parent.name == "lists" else train.parent  # lists.tar unpacks flat
    images = _image_dir(root, "Images", lists["train"][0][0], "stanford_dogs", near=home)
    annotations = images.parent / "Annotation"
    if bbox_crop and not annotations.is_dir():
        raise UserError(f"data.bbox_crop with stanford_dogs needs the Annotation/ folder beside {images}")
    out = _Builder("stanford_dogs", class_names, boxes=bbox_crop, keep_missing=keep_missing)
    for split, (files, labels, annos, path) in lists.items():
        for f, k, a in zip(files, labels, annos):
            box = _dog_box(annotations / a) if bbox_crop else None
            out.add(images / f, _label(k, n, path.name), f, split, box)
    return out.done()


# ----------------------------------------------------------------------------- Oxford Flowers-102
def read_flowers102(root: str | Path, *, keep_missing: bool = False) -> Records:
    """Oxford Flowers-102 (Nilsback & Zisserman 2008): ``imagelabels.mat`` (1-based labels of
    ``jpg/image_NNNNN.jpg``) and ``setid.mat``'s official splits: 1,020 train, 1,020 val, 6,149 test."""
    from torchvision.datasets import Flowers102

    root = Path(root)
    labels_path = _require(root, "imagelabels.mat", "flowers102")
    setid_path = _require(root, "setid.mat", "flowers102", near=labels_path.parent)
    labels = _mat_list(_loadmat(labels_path), "labels", labels_path, int)
    setid = _loadmat(setid_path)
    # the dataset ships no class names; torchvision >= 0.21 carries the list everyone uses
    class_names = list(getattr(Flowers102, "classes", None) or [f"flower {k:03d}" for k in range(1, 103)])
    images = _image_dir(root, "jpg", "image_00001.jpg", "flowers102", near=labels_path.parent)
    out = _Builder("flowers102", class_names, boxes=False, keep_missing=keep_missing)
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for number in sorted(_mat_list(setid, key, setid_path, int)):
            if not 1 <= number <= len(labels):
                raise UserError(f"setid.mat {key}: image {number} is outside 1..{len(labels)} (imagelabels.mat)")
            name = f"image_{number:05d}.jpg"
            out.add(images / name, _label(labels[number - 1], len(class_names), "imagelabels.mat"), name, split)
    return out.done()


# ----------------------------------------------------------------------------- Oxford-IIIT Pets
def read_oxford_pets(root: str | Path, *, keep_missing: bool = False) -> Records:
    """Oxford-IIIT Pets (Parkhi et al. 2012): 37 breeds, 3,680 trainval / 3,669 test, from
    ``annotations/{trainval,test}.txt`` (``name class species breed``, 1-based); the species
    (cat, dog) is the coarser level ``Records.levels["species"]``."""
    root = Path(root)
    trainval = _require(root, "trainval.txt", "oxford_pets", parent="annotations")
    test = _require(root, "test.txt", "oxford_pets", near=trainval.parent)
    rows = []
    for split, path in (("train", trainval), ("test", test)):
        for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
                raise UserError(f"{path.name} line {lineno}: expected 'name class species breed', got {line!r}")
            rows.append((split, parts[0], int(parts[1]), int(parts[2])))
    if not rows:
        raise UserError(f"oxford_pets: {trainval.name} and {test.name} list no images")
    names: dict[int, str] = {}
    species: dict[int, int] = {}
    for _, name, k, sp in rows:
        names.setdefault(k, " ".join(w.title() for w in name.rsplit("_", 1)[0].split("_")))
        species.setdefault(k, sp)
    n = max(names)
    if sorted(names) != list(range(1, n + 1)):
        raise UserError(f"oxford_pets: class ids 1..{n} expected, {n - len(names)} missing")
    images = _image_dir(root, "images", rows[0][1] + ".jpg", "oxford_pets", near=trainval.parent.parent)
    out = _Builder("oxford_pets", [names[k] for k in range(1, n + 1)], boxes=False, keep_missing=keep_missing)
    for split, name, k, _ in rows:
        out.add(images / f"{name}.jpg", k - 1, name, split)
    rec = out.done()
    rec.levels = {"species": (["cat", "dog"], [species[k] - 1 for k in range(1, n + 1)])}
    return rec


# ----------------------------------------------------------------------------- auto and the registry
# (format, marker file, folder the marker must be in or None), tried in this order
_MARKERS = [("nabirds", "hierarchy.txt", None), ("cub", "image_class_labels.txt", None),
            ("stanford_cars", "cars_meta.mat", None), ("stanford_cars", "cars_annos.mat", None),
            ("fgvc_aircraft", "images_variant_test.txt", None), ("stanford_dogs", "train_list.mat", None),
            ("flowers102", "setid.mat", None), ("oxford_pets", "trainval.txt", "annotations")]


def detect_format(root: str | Path) -> tuple[str, str]:
    """``(format, reason)``: the reader for the files under ``root`` (the first layout whose
    marker file is found; NABirds before CUB, which shares its files); a folder of class
    folders is ``imagefolder``. A UserError when nothing matches."""
    root = Path(root)
    for fmt, marker, parent in _MARKERS:
        found = find_file(root, marker, parent=parent)
        if found is not None and (fmt != "nabirds" or (found.parent / "images.txt").is_file()):
            return fmt, f"found {found.relative_to(root)}"
    try:
        read_imagefolder(root)
        return "imagefolder", "found class folders of images"
    except UserError:
        pass
    known = ", ".join(sorted({m for _, m, _ in _MARKERS}))
    raise UserError(f"data.format=auto: no known dataset layout under {root} (looked for {known} and class "
                    "folders); pass --data.format")


Reader = Callable[..., Records]  # (root, bbox_crop, keep_missing, problems, label_level) -> Records
READERS: dict[str, Reader] = {
    "cub": lambda root, bbox, keep, problems, level: _read_cub_anywhere(root, bbox, keep, problems),
    "nabirds": lambda root, bbox, keep, problems, level: read_nabirds(root, bbox_crop=bbox, keep_missing=keep,
                                                                       problems=problems),
    "stanford_cars": lambda root, bbox, keep, problems, level: read_stanford_cars(root, bbox_crop=bbox,
                                                                                   keep_missing=keep),
    "fgvc_aircraft": lambda root, bbox, keep, problems, level: read_fgvc_aircraft(root, label_level=level,
                                                                                   bbox_crop=bbox, keep_missing=keep),
    "stanford_dogs": lambda root, bbox, keep, problems, level: read_stanford_dogs(root, bbox_crop=bbox,
                                                                                   keep_missing=keep),
    "flowers102": lambda root, bbox, keep, problems, level: read_flowers102(root, keep_missing=keep),
    "oxford_pets": lambda root, bbox, keep, problems, level: read_oxford_pets(root, keep_missing=keep),
}
BOXES = {"cub", "nabirds", "stanford_cars", "fgvc_aircraft", "stanford_dogs", "toy"}  # formats with boxes


def register_format(name: str, reader: Reader, *, boxes: bool = False,
                    official: Optional[dict] = None) -> None:
    """Add a dataset reader ``reader(root, bbox_crop, keep_missing, problems, label_level) -> Records``
    under ``name`` for :func:`fgclf.data.load_records` (the scripts' ``--data.format`` choices are
    the built-in names).
    ``official``: its published counts, as in :data:`OFFICIAL_COUNTS`."""
    READERS[name] = reader
    if boxes:
        BOXES.add(name)
    if official is not None:
        OFFICIAL_COUNTS[name] = official


def official_count_notes(fmt: str, rec: Records, label_level: Optional[str] = None) -> list[str]:
    """One warning line when ``rec`` (as read, before any validation split is carved out)
    differs from ``fmt``'s published protocol in images per split or classes; else []."""
    official = OFFICIAL_COUNTS.get(fmt)
    if official is None:
        return []
    want_classes = official["classes"]
    if isinstance(want_classes, dict):
        want_classes = want_classes[label_level or next(iter(want_classes))]
    found = Counter(rec.splits)
    diffs = [f"{s} {found.get(s, 0)} images (official {n})" for s, n in official["splits"].items() if found.get(s, 0) != n]
    diffs += [f"{s} {k} images (official none)" for s, k in found.items() if s not in official["splits"]]
    used = len(set(rec.labels))
    if used != want_classes:
        diffs.append(f"{used} classes with images (official {want_classes})")
    if not diffs:
        return []
    return [f"warning: this {fmt} copy is not the official protocol: {'; '.join(diffs)}; results on it are not "
            "comparable with published numbers"]


def read_format(fmt: str, root: str, *, bbox_crop: bool, keep_missing: bool, problems: Optional[list[str]],
                label_level: Optional[str] = None) -> Records:
    """Read ``root`` with the reader of ``fmt`` (``auto``: detected), record the format chosen
    in ``Records.format`` and the notes (auto's choice, count differences) in ``Records.notes``."""
    notes = []
    if fmt == "auto":
        fmt, why = detect_format(root)
        notes.append(f"data.format auto: {fmt} ({why})")
    if fmt not in READERS:
        raise UserError(f"unknown data format '{fmt}'; known: {', '.join(list_formats())}")
    if label_level is not None and fmt != "fgvc_aircraft":
        raise UserError(f"data.label_level applies to fgvc_aircraft only (the format is {fmt})")
    if bbox_crop and fmt not in BOXES:
        raise UserError(f"data.bbox_crop: {fmt} has no bounding boxes (boxes: {', '.join(sorted(BOXES - {'toy'}))})")
    rec = READERS[fmt](root, bbox_crop, keep_missing, problems, label_level)
    rec.format = fmt
    toy = fmt == "cub" and find_file(root, "toy_meta.json", depth=1) is not None  # the embedded toy set: not CUB
    rec.notes = notes + ([] if toy else official_count_notes(fmt, rec, label_level))
    return rec


def read_levels_file(path: str | Path, class_names: list[str]) -> dict[str, tuple[list[str], list[int]]]:
    """Coarser label levels from a CSV file: a header ``class,<level>,<level>...`` and one row per
    class (its name as the dataset names it), e.g. CUB's order and family
    (``configs/cub_levels.csv``); lines starting with ``#`` are comments. Returns
    ``{level: (coarse class names, sorted; coarse index of each class)}`` (as ``Records.levels``).

    Every class of the dataset needs exactly one row (extra rows are ignored); a missing file,
    a missing class, a repeated one or an empty cell is a UserError naming it.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.levels_file: no such file {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:  # lines starting with '#' are comments
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    if not rows or len(rows[0]) < 2 or rows[0][0].strip() != "class":
        raise UserError(f"{path.name}: the first line must be the header 'class,<level>[,<level>...]'")
    levels = [h.strip() for h in rows[0][1:]]
    of_class: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(levels) + 1 or not all(cell.strip() for cell in row):
            raise UserError(f"{path.name} line {lineno}: expected {len(levels) + 1} non-empty fields, got {row}")
        name = row[0].strip()
        if name in of_class:
            raise UserError(f"{path.name} line {lineno}: class {name!r} is listed twice")
        of_class[name] = [cell.strip() for cell in row[1:]]
    missing = [c for c in class_names if c not in of_class]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path.name}: no row for class {missing[0]!r}{more}")
    out = {}
    for k, level in enumerate(levels):
        names = sorted({of_class[c][k] for c in class_names})
        index = {n: i for i, n in enumerate(names)}
        out[level] = (names, [index[of_class[c][k]] for c in class_names])
    return out


def list_formats() -> list[str]:
    """Every ``--data.format``: the registered readers, ``toy``, ``imagefolder``, ``hf`` and ``auto``."""
    return ["toy", *READERS, "imagefolder", "hf", "auto"]


__all__ = ["AIRCRAFT_LEVELS", "OFFICIAL_COUNTS", "READERS", "detect_format", "find_file", "list_formats",
           "official_count_notes", "read_fgvc_aircraft", "read_flowers102", "read_format", "read_levels_file", "read_nabirds",
           "read_oxford_pets", "read_stanford_cars", "read_stanford_dogs", "register_format"]
