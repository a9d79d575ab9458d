"""Bad dataset input, item by item: read correctly when it is only unusual (CRLF, BOM, spaces,
non-ASCII, image modes, stray files), else a one-line UserError naming the file, line or class.

Each test builds its own small CUB-layout or ImageFolder dataset in tmp_path (in-process, < 1 s).
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fgclf.data import (find_bad_images, inspect_image, load_image, load_records, load_records_from_config, read_cub,
                        read_imagefolder)
from fgclf.errors import UserError

CLASSES = ["001.A", "002.B"]


def _rows(n: int = 8) -> list[tuple[str, str, int, int]]:
    """(id, relative path, class id, is_train): alternating classes, the last two of each class are test."""
    return [(str(i), f"{CLASSES[(i - 1) % 2]}/img_{i}.png", (i - 1) % 2 + 1, int(i <= n - 4)) for i in range(1, n + 1)]


def _write(root: Path, rows=None, classes=CLASSES, *, images: bool = True, sep: str = " ", eol: str = "\n",
           bom: str = "", boxes=None) -> Path:
    """A CUB-layout folder; ``sep``, ``eol`` and ``bom`` shape every manifest the same way."""
    rows = _rows() if rows is None else rows
    if images:
        for k, (_, rel, _, _) in enumerate(rows):
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.new("RGB", (20, 10), (k * 20 % 256, 0, 0)).save(path)
    (root / "images").mkdir(parents=True, exist_ok=True)

    def table(name: str, lines: list[str]) -> None:
        (root / name).write_bytes((bom + "".join(ln + eol for ln in lines)).encode("utf-8"))

    table("images.txt", [f"{i}{sep}{rel}" for i, rel, _, _ in rows])
    table("image_class_labels.txt", [f"{i}{sep}{c}" for i, _, c, _ in rows])
    table("train_test_split.txt", [f"{i}{sep}{t}" for i, _, _, t in rows])
    table("classes.txt", [f"{k + 1}{sep}{name}" for k, name in enumerate(classes)])
    table("bounding_boxes.txt", boxes or [f"{i}{sep}2.0{sep}1.0{sep}8.0{sep}5.0" for i, _, _, _ in rows])
    return root


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _same(a, root_a: Path, b, root_b: Path) -> None:
    assert (a.image_ids, a.labels, a.splits, a.class_names, a.bboxes) == (b.image_ids, b.labels, b.splits,
                                                                          b.class_names, b.bboxes)
    assert [os.path.relpath(p, root_a) for p in a.items] == [os.path.relpath(p, root_b) for p in b.items]


# ----------------------------------------------------------------------------- accepted and read correctly
def test_manifests_with_crlf_bom_extra_spaces_and_blank_lines_read_like_clean_ones(tmp_path):
    clean = read_cub(_write(tmp_path / "clean"), bbox_crop=True)
    messy = _write(tmp_path / "messy", sep=" \t  ", eol="  \r\n\r\n", bom="\ufeff")
    assert (messy / "images.txt").read_bytes().startswith(b"\xef\xbb\xbf1 \t  001.A/img_1.png  \r\n\r\n")
    _same(read_cub(messy, bbox_crop=True), messy, clean, tmp_path / "clean")
    assert [Path(p).name for p in clean.items] == [f"img_{i}.png" for i in range(1, 9)]
    assert clean.bboxes[0] == (2.0, 1.0, 8.0, 5.0)
    old_mac = _write(tmp_path / "cr", eol="\r")  # classic Mac line ends
    assert read_cub(old_mac).image_ids == clean.image_ids


def test_utf16_manifest_with_bom_is_read(tmp_path):
    """PowerShell's ``>`` writes UTF-16 with a BOM."""
    root = _write(tmp_path)
    text = (root / "images.txt").read_text()
    (root / "images.txt").write_bytes(text.encode("utf-16"))
    assert read_cub(root).image_ids == [str(i) for i in range(1, 9)]


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
    rows = [(str(i), f"{'001.Ähre Vögel' if i % 2 else '002.鳥 B'}/ {i} Çà va  鸟.png", 2 - i % 2, int(i <= 4))
            for i in range(1, 9)]
    root = _write(tmp_path, rows, ["001.Ähre Vögel", "002.鳥 B"])
    rec = read_cub(root)
    assert rec.class_names == ["001.Ähre Vögel", "002.鳥 B"]
    assert [Path(p).name for p in rec.items] == [f" {i} Çà va  鸟.png" for i in range(1, 9)]  # spaces kept
    assert rec.labels == [0, 1] * 4
    assert all(Path(p).is_file() for p in rec.items)


def test_name_in_the_other_unicode_normal_form_is_found(tmp_path):
    """A manifest in NFC finds the file that a macOS copy stored in NFD (and the reverse)."""
    nfc = "001.A/caf\u00e9.png"
    root = _write(tmp_path, [("1", nfc, 1, 1), ("2", "001.A/b.png", 1, 0), ("3", "002.B/c.png", 2, 1),
                             ("4", "002.B/d.png", 2, 0)])
    disk = root / "images" / nfc
    disk.rename(root / "images" / unicodedata.normalize("NFD", nfc))
    rec = read_cub(root)
    assert Path(rec.items[0]).is_file() and unicodedata.normalize("NFC", Path(rec.items[0]).name) == "caf\u00e9.png"


def test_path_with_dot_dot_inside_the_root_and_symlinked_images_are_accepted(tmp_path):
    root = _write(tmp_path / "d")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4)).save(outside)
    (root / "images" / "001.A" / "img_1.png").unlink()
    (root / "images" / "001.A" / "img_1.png").symlink_to(outside)  # a subset built from links
    _replace(root / "images.txt", "3 001.A/img_3.png", "3 002.B/../001.A/img_3.png")
    rec = read_cub(root)
    assert rec.items[0] == str(outside.resolve())
    assert rec.items[2] == str((root / "images" / "001.A" / "img_3.png").resolve())


@pytest.mark.parametrize("mode,fmt", [("L", "png"), ("P", "png"), ("P-transparent", "png"), ("RGBA", "png"),
                                      ("LA", "png"), ("CMYK", "jpeg"), ("I;16", "png"), ("I;16", "tiff"),
                                      ("1", "png"), ("RGB", "webp")])
def test_image_files_in_every_mode_load_as_rgb(tmp_path, mode, fmt):
    """Stored modes are converted on load (values kept, 16-bit scaled down, transparency on white)."""
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    if mode == "I;16":
        img = Image.fromarray(gray.astype("<u2") * 257)
    elif mode == "P-transparent":
        img = Image.fromarray(gray, "L").convert("P")
        img.info["transparency"] = 0
    else:
        img = Image.fromarray(gray, "L").convert(mode)
    path = tmp_path / f"x.{fmt}"
    img.save(path, **({"transparency": 0} if mode == "P-transparent" else {}))
    info = inspect_image(str(path))
    assert info.error is None and info.size == (8, 6)
    assert info.mode == ("P" if mode == "P-transparent" else mode)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode in ("L", "P", "I;16", "LA", "RGBA"):
        np.testing.assert_array_equal(np.asarray(out)[..., 0], gray)


def test_imagefolder_ignores_non_image_and_hidden_files(tmp_path):
    for cls in ("cat", "dog"):
        for k in range(3):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{k}.JPG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0" * 10)
    (tmp_path / "cat" / "._0.JPG").write_bytes(b"\0\x05\x16\x07")  # macOS AppleDouble with an image extension
    (tmp_path / "dog" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (tmp_path / ".trash").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".trash" / "x.png")
    rec = read_imagefolder(tmp_path)
    assert rec.class_names == ["cat", "dog"]
    assert sorted(os.path.relpath(p, tmp_path) for p in rec.items) == sorted(
        f"{c}/{k}.JPG" for c in ("cat", "dog") for k in range(3))


def test_file_with_an_image_extension_that_is_not_an_image_is_unreadable(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(4):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{k}.png")
    fake = tmp_path / "cat" / "readme.jpg"
    fake.write_text("this is text")
    cfg = SimpleNamespace(format="imagefolder", root=str(tmp_path), bbox_crop=False, val_fraction=0.0,
                          test_fraction=0.25, split_seed=0, num_folds=0, fold=0, verify_images="full",
                          skip_bad_images=False, toy_num_classes=2, toy_train_per_class=1, toy_test_per_class=1,
                          toy_image_size=8, toy_seed=0)
    with pytest.raises(UserError, match=r"unreadable image .*readme\.jpg: UnidentifiedImageError"):
        load_records_from_config(cfg)
    cfg.skip_bad_images = True
    rec, bad = load_records_from_config(cfg)
    assert [p for p, _ in bad] == [str(fake)] and str(fake) not in rec.items and len(rec) == 8


def test_truncated_png_is_unreadable(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:-300])
    assert dict(find_bad_images([str(good), str(trunc)])).keys() == {str(trunc)}
    assert inspect_image(str(trunc)).error.startswith(("OSError", "SyntaxError"))


# ----------------------------------------------------------------------------- refused, naming file and line
@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                                  "bounding_boxes.txt"])
def test_duplicate_id_names_the_file_and_both_lines(tmp_path, name):
    root = _write(tmp_path)
    first = (root / name).read_text().splitlines()[1]
    _append(root / name, first)
    n = len((root / name).read_text().splitlines())
    with pytest.raises(UserError, match=rf"^{name} line {n}: duplicate id 2 \(first on line 2\)$"):
        read_cub(root, bbox_crop=True)


@pytest.mark.parametrize("name,line", [("image_class_labels.txt", "99 1"), ("train_test_split.txt", "99 1"),
                                       ("bounding_boxes.txt", "99 1 1 2 2")])
def test_unknown_id_names_the_file_and_line(tmp_path, name, line):
    root = _write(tmp_path)
    _append(root / name, line)
    with pytest.raises(UserError, match=rf"^{name} line 9: image id 99 is not in images.txt$"):
        read_cub(root, bbox_crop=True)


def test_every_missing_file_is_counted(tmp_path):
    root = _write(tmp_path)
    for i in (3, 6):
        (root / "images" / CLASSES[(i - 1) % 2] / f"img_{i}.png").unlink()
    with pytest.raises(UserError, match=r"images.txt id 3 names a missing file: .*img_3.png \(and 1 more missing "
                                        r"files\); restore the files or pass --data.skip_bad_images true"):
        read_cub(root)


def _config(root: Path, **kw) -> SimpleNamespace:
    base = dict(format="cub", root=str(root), bbox_crop=False, val_fraction=0.0, test_fraction=0.2, split_seed=0,
                num_folds=0, fold=0, verify_images="full", skip_bad_images=False, toy_num_classes=2,
                toy_train_per_class=1, toy_test_per_class=1, toy_image_size=8, toy_seed=0)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("verify", ["full", "header", "none"])
def test_missing_files_are_bad_images_skipped_with_the_flag(tmp_path, verify):
    """A partial copy: listed files that are not there are skipped and listed like unreadable
    ones (whatever verify_images), the other images keep the labels and splits of the full copy."""
    full = read_cub(_write(tmp_path / "full"))
    root = _write(tmp_path / "partial")
    lost = [root / "images" / "001.A/img_3.png", root / "images" / "002.B/img_6.png"]
    for path in lost:
        path.unlink()
    rec, bad = load_records_from_config(_config(root, verify_images=verify, skip_bad_images=True))
    assert bad == [(str(p.resolve()), "missing file") for p in lost]
    keep = [i not in ("3", "6") for i in full.image_ids]
    assert rec.image_ids == full.select(keep).image_ids and rec.labels == full.select(keep).labels
    assert rec.splits == full.select(keep).splits
    with pytest.raises(UserError, match=r"^images.txt id 3 names a missing file: .*img_3.png \(and 1 more missing "
                                        r"files\); restore the files or pass --data.skip_bad_images true"):
        load_records_from_config(_config(root, verify_images=verify))


def test_missing_and_unreadable_images_are_skipped_together(tmp_path):
    root = _write(tmp_path)
    (root / "images" / "001.A/img_1.png").unlink()
    (root / "images" / "002.B/img_2.png").write_bytes(b"")
    rec, bad = load_records_from_config(_config(root, skip_bad_images=True))
    assert [(Path(p).name, why) for p, why in bad] == [("img_1.png", "missing file"), ("img_2.png", "zero-byte file")]
    assert rec.image_ids == [str(i) for i in range(3, 9)]


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "001.A/../../images.txt", "../classes.txt"])
def test_paths_outside_the_image_root_are_refused(tmp_path, rel):
    root = _write(tmp_path)
    _replace(root / "images.txt", "2 002.B/img_2.png", f"2 {rel}")
    with pytest.raises(UserError, match=rf"^images.txt line 2: id 2: path '{rel}' leaves the dataset root"):
        read_cub(root)


@pytest.mark.parametrize("name,old,new,needle", [
    ("image_class_labels.txt", "3 1", "3 one", r"image_class_labels.txt line 3: class id 'one' of image 3 is not an integer"),
    ("image_class_labels.txt", "3 1", "3 3", r"image id 3 has class 3, outside 1..2 \(image_class_labels.txt line 3\)"),
    ("train_test_split.txt", "3 1", "3 yes", r"train_test_split.txt line 3: is_training_image must be 1 or 0, got 'yes'"),
    ("classes.txt", "2 002.B", "two 002.B", r"classes.txt line 2: class id 'two' is not a positive integer"),
    # not 1..N: the ids the images use are the classes (NABirds); image 2's class 2 is then unknown
    ("classes.txt", "2 002.B", "3 002.B", r"^image_class_labels.txt line 2: class id 2 of image 2 is not in classes.txt$"),
    ("classes.txt", "2 002.B", "2 001.A", r"classes.txt line 2: class name '001.A' is also on line 1"),
    ("bounding_boxes.txt", "3 2.0 1.0 8.0 5.0", "3 2.0 1.0 eight 5.0", r"bounding_boxes.txt line 3: box '2.0 1.0 eight 5.0' is not 4 numbers"),
    ("bounding_boxes.txt", "3 2.0 1.0 8.0 5.0", "3 2.0 1.0 0 5.0", r"bounding_boxes.txt line 3: box .* width and height > 0"),
    ("bounding_boxes.txt", "3 2.0 1.0 8.0 5.0", "3 2.0 1.0 8.0", r"bounding_boxes.txt line 3: expected 5 fields"),
    ("images.txt", "3 001.A/img_3.png", "3", r"images.txt line 3: expected 2 fields, got '3'"),
])
def test_bad_values_name_the_file_and_line(tmp_path, name, old, new, needle):
    root = _write(tmp_path)
    _replace(root / name, old + "\n", new + "\n")
    with pytest.raises(UserError, match=needle) as err:
        read_cub(root, bbox_crop=True)
    assert "\n" not in str(err.value)


def test_manifest_that_is_not_utf8_names_the_line(tmp_path):
    root = _write(tmp_path)
    (root / "images.txt").write_bytes((root / "images.txt").read_bytes() + "9 001.A/caf\u00e9.png\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"images.txt line 9 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        read_cub(root)


def test_empty_images_manifest(tmp_path):
    root = _write(tmp_path)
    (root / "images.txt").write_text("\r\n")
    with pytest.raises(UserError, match="images.txt lists no images"):
        read_cub(root)


# ----------------------------------------------------------------------------- classes
def test_class_without_images_is_refused_by_name(tmp_path):
    root = _write(tmp_path, classes=[*CLASSES, "003.Empty"])
    with pytest.raises(UserError, match=r"^1 of 3 classes have no images at all: '003.Empty'; a classifier cannot"):
        load_records(format="cub", root=str(root))


def test_empty_imagefolder_class_folder_is_refused_by_name(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(4):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"1 of 3 classes have no images at all: 'emu'"):
        load_records(format="imagefolder", root=str(tmp_path))


def test_class_in_test_but_not_train_is_refused_by_name(tmp_path):
    rows = [(i, rel, c, t if c == 1 else 0) for i, rel, c, t in _rows()]  # class 2: test images only
    root = _write(tmp_path, rows)
    with pytest.raises(UserError, match=r"classes in val/test but not in train: '002.B' \(4 test\); they cannot"):
        load_records(format="cub", root=str(root))


def test_imagefolder_class_only_in_the_test_folder_is_refused(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "emu"])):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (4, 4)).save(tmp_path / split / cls / f"{k}.png")
    with pytest.raises(UserError, match=r"classes in val/test but not in train: 'emu' \(3 test\)"):
        load_records(format="imagefolder", root=str(tmp_path), val_fraction=0.3)


def test_skipping_bad_images_must_leave_train_images_in_every_class(tmp_path):
    root = _write(tmp_path)
    for i in (2, 4):  # every train image of class 002.B
        (root / "images" / f"002.B/img_{i}.png").write_bytes(b"")
    cfg = SimpleNamespace(format="cub", root=str(root), bbox_crop=False, val_fraction=0.0, test_fraction=0.2,
                          split_seed=0, num_folds=0, fold=0, verify_images="full", skip_bad_images=True,
                          toy_num_classes=2, toy_train_per_class=1, toy_test_per_class=1, toy_image_size=8, toy_seed=0)
    with pytest.raises(UserError, match=r"^after skipping 2 unreadable images: classes in val/test but not in "
                                        r"train: '002.B' \(2 test\)"):
        load_records_from_config(cfg)
