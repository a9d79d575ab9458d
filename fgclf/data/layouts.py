"""Tiny generated copies of the fine-grained datasets' native layouts.

``write_layout("stanford_cars", root)`` writes a few toy images per class (the embedded toy
dataset's renderer, so they are learnable and have true boxes) with the annotation files of the
real dataset, quirks included: ``.mat`` files written with scipy, 1-based labels, labels in a
separate file (Cars' test labels), nested mirror folders, non-contiguous class ids (NABirds),
VOC box files (Dogs), names with spaces (Aircraft). The readers of :mod:`fgclf.data.formats`
are tested on them, and a user can try a recipe's command on one before downloading anything:

    python scripts/make_toy_dataset.py --layout fgvc_aircraft --root /tmp/aircraft_tiny
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from fgclf.data.toy import add_cub_lines, render_toy_sample, toy_classes
from fgclf.errors import UserError

LAYOUTS = ("cub", "nabirds", "stanford_cars", "fgvc_aircraft", "stanford_dogs", "flowers102", "oxford_pets")
PETS_NAMES = ["Abyssinian", "american_bulldog", "Bengal", "beagle", "Birman", "boxer", "Bombay", "chihuahua"]


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


def _images(num_classes: int, counts: dict[str, int], size: int, seed: int):
    """``(split, class index, k, image, (x, y, w, h))`` for ``counts[split]`` images per class."""
    classes = toy_classes(max(num_classes, 2))
    k = 0
    for split, n in counts.items():
        for c in range(num_classes):
            for _ in range(n):
                k += 1
                img, box = render_toy_sample(seed, c, k, classes[c][1], size)
                yield split, c, k, img, box


def _savemat(path: Path, data: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), data)


def _cells(values) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        out[i, 0] = v
    return out


def _struct(rows: list[dict]) -> np.ndarray:
    """A MATLAB struct array (1 x N) of ``rows``."""
    keys = list(rows[0])
    arr = np.empty((1, len(rows)), dtype=[(k, object) for k in keys])
    for i, row in enumerate(rows):
        for k in keys:
            arr[0, i][k] = row[k]
    return arr


def _corners(box) -> tuple[float, float, float, float]:
    """(x, y, w, h) in 0-based pixels as 1-based inclusive corners (how the .mat/VOC files store them)."""
    x, y, w, h = box
    return round(x + 1), round(y + 1), round(x + w), round(y + h)


def write_layout(fmt: str, root: str | Path, *, num_classes: int = 4, train_per_class: int = 3,
                 val_per_class: int = 1, test_per_class: int = 2, image_size: int = 40, seed: int = 0,
                 variant: Optional[str] = None) -> Path:
    """Write a tiny copy of ``fmt``'s layout under ``root`` (a new or empty folder); returns ``root``.

    Args:
        val_per_class: Images per class of the validation split, for the datasets that ship one
            (fgvc_aircraft, flowers102); the others have train and test only.
        variant: ``stanford_cars``: ``devkit`` (default: ``devkit/`` + ``cars_train/`` as the devkit
            ships), ``mirror`` (``car_devkit/devkit/``, ``cars_train/cars_train/``, the test
            labels beside them as ``cars_test_annos_withlabels (1).mat``) or ``single`` (the older
            ``cars_annos.mat`` + ``car_ims/``); ``stanford_dogs``: ``flat`` (default: the lists
            beside ``Images/``, as the official ``lists.tar`` unpacks) or ``lists`` (in ``lists/``).

    flowers102 always has 102 classes (its class names are fixed); ``num_classes`` is ignored.
    """
    if fmt not in LAYOUTS:
        raise UserError(f"unknown layout {fmt!r}; known: {', '.join(LAYOUTS)}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_per_class, "test": test_per_class}
    if fmt in ("fgvc_aircraft", "flowers102"):
        counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    if fmt == "flowers102":
        num_classes = 102
    writer = {"cub": _cub, "nabirds": _nabirds, "stanford_cars": _cars, "fgvc_aircraft": _aircraft,
              "stanford_dogs": _dogs, "flowers102": _flowers, "oxford_pets": _pets}[fmt]
    kwargs = ({"variant": variant or "devkit"} if fmt == "stanford_cars" else
              {"variant": variant or "flat"} if fmt == "stanford_dogs" else {})
    images = list(_images(num_classes, counts, image_size, seed))
    files = writer(root, images, num_classes, **kwargs)
    truth = [[str(Path(f).relative_to(root)), c, split, [round(v, 2) for v in box]]
             for f, (split, c, _, _, box) in zip(files, images)]
    (root / "fgclf_layout.json").write_text(json.dumps({
        "layout": fmt, "variant": variant, "num_classes": num_classes, "per_class": counts, "image_size": image_size,
        "images": truth}) + "\n")  # [file, class index, split, true box (x, y, w, h)] per image
    return root


def _cub_files(root: Path, images, class_lines: list[str], class_id, image_id) -> list[Path]:
    rows: dict[str, list[str]] = {n: [] for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                                  "bounding_boxes.txt")}
    files = []
    for split, c, k, img, box in images:
        rel = f"{c + 1:03d}.class_{c}/img_{k:04d}.jpg"
        _save(img, root / "images" / rel)
        files.append(root / "images" / rel)
        add_cub_lines(rows, image_id(k), rel, class_id(c), split == "train", box)
    for name, lines in rows.items():
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(class_lines) + "\n")
    return files


def _cub(root: Path, images, n: int) -> list[Path]:
    base = root / "CUB_200_2011"  # as the archive extracts
    base.mkdir()
    return _cub_files(base, images, [f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(n)], lambda c: c + 1, str)


def _nabirds(root: Path, images, n: int) -> list[Path]:
    """Classes are leaves with ids 300, 307, ... under parents 10, 11 (two leaves each) under 0."""
    leaf = lambda c: 300 + 7 * c  # noqa: E731
    parent = lambda c: 10 + c // 2  # noqa: E731
    parents = sorted({parent(c) for c in range(n)})
    class_lines = ["0 Birds"] + [f"{p} Family {p}" for p in parents] + [f"{leaf(c)} Species {c}" for c in range(n)]
    files = _cub_files(root, images, class_lines, leaf, lambda k: f"{k:08d}-0000-4000-8000-{k:012d}")
    (root / "hierarchy.txt").write_text("".join(f"{p} 0\n" for p in parents)
                                        + "".join(f"{leaf(c)} {parent(c)}\n" for c in range(n)))
    return files


def _cars(root: Path, images, n: int, variant: str) -> list[Path]:
    class_names = np.array([f"Make{c} Model {c} 20{10 + c}" for c in range(n)], dtype=object)
    files = []
    if variant == "single":
        rows = []
        for split, c, k, img, box in images:
            _save(img, root / "car_ims" / f"{k:06d}.jpg")
            files.append(root / "car_ims" / f"{k:06d}.jpg")
            x1, y1, x2, y2 = _corners(box)
            rows.append({"relative_im_path": f"car_ims/{k:06d}.jpg", "bbox_x1": x1, "bbox_y1": y1, "bbox_x2": x2,
                         "bbox_y2": y2, "class": c + 1, "test": int(split == "test")})
        _savemat(root / "cars_annos.mat", {"annotations": _struct(rows), "class_names": class_names[None, :]})
        return files
    nest = variant == "mirror"
    devkit = root / ("car_devkit/devkit" if nest else "devkit")
    _savemat(devkit / "cars_meta.mat", {"class_names": class_names[None, :]})
    per_split: dict[str, list[dict]] = {"train": [], "test": []}
    for split, c, k, img, box in images:
        folder = root / f"cars_{split}" / (f"cars_{split}" if nest else "")
        fname = f"{len(per_split[split]) + 1:05d}.jpg"
        _save(img, folder / fname)
        files.append(folder / fname)
        x1, y1, x2, y2 = _corners(box)
        per_split[split].append({"bbox_x1": x1, "bbox_y1": y1, "bbox_x2": x2, "bbox_y2": y2, "class": c + 1,
                                 "fname": fname})
    _savemat(devkit / "cars_train_annos.mat", {"annotations": _struct(per_split["train"])})
    no_class = [{k: v for k, v in r.items() if k != "class"} for r in per_split["test"]]
    _savemat(devkit / "cars_test_annos.mat", {"annotations": _struct(no_class)})
    # the mirrors on Kaggle carry the test labels as "cars_test_annos_withlabels (1).mat", beside the folders
    labels_file = root / "cars_test_annos_withlabels (1).mat" if nest else devkit / "cars_test_annos_withlabels.mat"
    _savemat(labels_file, {"annotations": _struct(per_split["test"])})
    return files


def _aircraft(root: Path, images, n: int) -> list[Path]:
    """Variant ``c`` is in family ``c // 2`` of manufacturer ``c // 4`` (names with spaces and slashes)."""
    data = root / "fgvc-aircraft-2013b" / "data"
    variant = lambda c: f"Jet {c}00-A/B"  # noqa: E731
    family = lambda c: f"Jet {c // 2} family"  # noqa: E731
    maker = lambda c: f"Maker {c // 4}"  # noqa: E731
    lines: dict[str, list[str]] = {}
    boxes, files = [], []
    for split, c, k, img, box in images:
        image_id = f"{1000000 + k * 37:07d}"
        _save(img, data / "images" / f"{image_id}.jpg")
        files.append(data / "images" / f"{image_id}.jpg")
        for level, name in (("variant", variant), ("family", family), ("manufacturer", maker)):
            lines.setdefault(f"images_{level}_{split}.txt", []).append(f"{image_id} {name(c)}")
            if split in ("train", "val"):
                lines.setdefault(f"images_{level}_trainval.txt", []).append(f"{image_id} {name(c)}")
        boxes.append(f"{image_id} {' '.join(str(v) for v in _corners(box))}")
    for name, rows in lines.items():
        (data / name).write_text("\n".join(rows) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    for fname, name in (("variants.txt", variant), ("families.txt", family), ("manufacturers.txt", maker)):
        (data / fname).write_text("\n".join(dict.fromkeys(name(c) for c in range(n))) + "\n")
    return files


def _dogs(root: Path, images, n: int, variant: str) -> list[Path]:
    folder = lambda c: f"n0{2085620 + c}-Breed_{c}{'-Terrier' if c % 2 else ''}"  # noqa: E731
    lists: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "test": ([], [], [])}
    out = []
    for split, c, k, img, box in images:
        stem = f"{folder(c).split('-')[0]}_{k}"
        rel = f"{folder(c)}/{stem}.jpg"
        _save(img, root / "Images" / rel)
        out.append(root / "Images" / rel)
        x1, y1, x2, y2 = _corners(box)
        xml = (f"<annotation><filename>{stem}</filename><size><width>{img.width}</width><height>{img.height}</height>"
               f"</size><object><name>{folder(c)}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
               f"<ymax>{y2}</ymax></bndbox></object></annotation>")
        (root / "Annotation" / folder(c)).mkdir(parents=True, exist_ok=True)
        (root / "Annotation" / folder(c) / stem).write_text(xml)
        files, annos, labels = lists[split]
        files.append(rel)
        annos.append(f"{folder(c)}/{stem}")
        labels.append(float(c + 1))
    for split, (files, annos, labels) in lists.items():
        _savemat(root / ("lists" if variant == "lists" else "") / f"{split}_list.mat",
                 {"file_list": _cells(files), "annotation_list": _cells(annos), "labels": np.array(labels)[:, None]})
    return out


def _flowers(root: Path, images, n: int) -> list[Path]:
    labels, ids, files = [], {"trnid": [], "valid": [], "tstid": []}, []
    key = {"train": "trnid", "val": "valid", "test": "tstid"}
    for number, (split, c, _, img, _) in enumerate(images, 1):
        _save(img, root / "jpg" / f"image_{number:05d}.jpg")
        files.append(root / "jpg" / f"image_{number:05d}.jpg")
        labels.append(c + 1)
        ids[key[split]].append(number)
    _savemat(root / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)[None, :]})
    _savemat(root / "setid.mat", {k: np.array(v, dtype=np.uint16)[None, :] for k, v in ids.items()})
    return files


def _pets(root: Path, images, n: int) -> list[Path]:
    if n > len(PETS_NAMES):
        raise UserError(f"the oxford_pets layout is written with at most {len(PETS_NAMES)} classes")
    rows: dict[str, list[str]] = {"train": [], "test": []}
    files = []
    for split, c, k, img, _ in images:
        name = f"{PETS_NAMES[c]}_{k}"
        _save(img, root / "images" / f"{name}.jpg")
        files.append(root / "images" / f"{name}.jpg")
        species = 1 if PETS_NAMES[c][0].isupper() else 2  # the dataset capitalises cat breeds
        rows[split].append(f"{name} {c + 1} {species} {c // 2 + 1}")
    (root / "annotations").mkdir()
    header = "#Image CLASS-ID SPECIES BREED ID\n"
    (root / "annotations" / "trainval.txt").write_text("\n".join(rows["train"]) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(rows["test"]) + "\n")
    (root / "annotations" / "list.txt").write_text(header + "\n".join(rows["train"] + rows["test"]) + "\n")
    return files


__all__ = ["LAYOUTS", "write_layout"]
