"""fgclf.data.check: the whole-dataset report, checked against the manifests read independently."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgclf.config import DataConfig
from fgclf.data.check import check_dataset, format_report, run_check


def _manifest(root: Path, name: str) -> dict[str, str]:
    """{id: rest of line}, read here without fgclf."""
    return dict(line.split(" ", 1) for line in (root / name).read_text().splitlines() if line.strip())


def _expected_counts(root: Path) -> dict[str, dict[str, int]]:
    classes = _manifest(root, "classes.txt")
    labels, split = _manifest(root, "image_class_labels.txt"), _manifest(root, "train_test_split.txt")
    counts = Counter((classes[labels[i]], "train" if split[i] == "1" else "test") for i in _manifest(root, "images.txt"))
    return {name: {"train": counts[(name, "train")], "val": 0, "test": counts[(name, "test")]}
            for _, name in sorted(classes.items(), key=lambda kv: int(kv[0]))}


def test_counts_sizes_and_modes_equal_the_manifests(toy_root):
    report = check_dataset(format="cub", root=str(toy_root), val_fraction=0.0, workers=3)
    expected = _expected_counts(toy_root)
    # the toy set (toy_meta.json) in CUB layout is not CUB: no official-count warning
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.class_counts == expected and report.class_names == list(expected)
    assert report.split_counts == {"train": 40, "val": 0, "test": 20} and report.num_images == 60
    sizes = [Image.open(toy_root / "images" / rel).size for rel in _manifest(toy_root, "images.txt").values()]
    assert report.sizes == {"width": [32, 32, 32], "height": [32, 32, 32]} and set(sizes) == {(32, 32)}
    assert report.modes == {"RGB": 60} and report.converted == 0 and report.workers == 3
    assert report.unreadable == [] and report.duplicate_paths == [] and report.identical_files == []
    assert report.boxes_outside == [] and report.empty_classes == [] and report.classes_missing_from_train == []
    # with a validation split: it comes out of train, per class, as in training
    with_val = check_dataset(DataConfig(format="cub", root=str(toy_root)))
    for name, c in with_val.class_counts.items():
        assert c["train"] + c["val"] == expected[name]["train"] and c["test"] == expected[name]["test"] and c["val"] > 0


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    img.save(path, format=fmt)  # the manifest's .jpg name, any content: PIL reads by content


def _damage(toy_root: Path, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A copy with 3 unreadable images and 5 in other modes; returns (root, bad id -> path, id -> mode)."""
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    paths = {i: root / "images" / rel for i, rel in _manifest(root, "images.txt").items()}
    rgb = Image.open(paths["1"]).convert("RGB")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data = paths["1"].read_bytes()
    paths["1"].write_bytes(data[: len(data) // 2])  # truncated JPEG (train)
    _save(noisy, paths["12"], "PNG")
    paths["12"].write_bytes(paths["12"].read_bytes()[:-400])  # truncated PNG (test)
    paths["20"].write_bytes(b"")  # zero-byte (train)
    modes = {"25": "CMYK", "30": "I;16", "35": "RGBA", "40": "P", "45": "L"}
    for i, mode in modes.items():
        if mode == "I;16":
            _save(Image.fromarray(np.asarray(rgb.convert("L")).astype("<u2") * 257), paths[i], "PNG")
        else:
            _save(rgb.convert(mode), paths[i], "JPEG" if mode in ("CMYK", "L") else "PNG")
    bad = {i: str(paths[i].resolve()) for i in ("1", "12", "20")}
    return root, bad, modes


def test_corrupt_copy_reports_exactly_the_bad_files_and_the_converted_modes(toy_root, tmp_path):
    root, bad, modes = _damage(toy_root, tmp_path)
    report = check_dataset(format="cub", root=str(root), val_fraction=0.0)
    assert {u["id"]: u["path"] for u in report.unreadable} == bad
    reasons = {u["id"]: u["reason"] for u in report.unreadable}
    assert reasons["20"] == "zero-byte file" and reasons["1"].startswith("OSError")
    assert report.modes == {"RGB": 52, **{m: 1 for m in modes.values()}} and report.converted == 5
    assert sorted(report.errors) == sorted(f"unreadable image {p}: {reasons[i]}" for i, p in bad.items())
    assert not report.ok and report.class_counts == _expected_counts(root)  # counts are the manifests'
    text = format_report(report)
    assert "3 unreadable images (listed above)" in text and "(5 converted to RGB on load)" in text
    assert "CMYK 1" in text and "I;16 1" in text and "result: NOT trainable" in text
    # skipping them, as training would with the same flag: warnings, and trainable
    skipped = check_dataset(format="cub", root=str(root), val_fraction=0.0, skip_bad_images=True)
    assert skipped.ok and skipped.errors == [] and len(skipped.unreadable) == 3
    assert any("3 unreadable images will be skipped" in w for w in skipped.warnings)


def test_duplicates_and_identical_content_are_warnings(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    images = _manifest(root, "images.txt")
    labels, split = _manifest(root, "image_class_labels.txt"), _manifest(root, "train_test_split.txt")
    # id 61 lists the same file as id 1; test image 11 becomes a byte copy of train image 2
    for name, value in (("images.txt", images["1"]), ("image_class_labels.txt", labels["1"]),
                        ("train_test_split.txt", "0"), ("bounding_boxes.txt", "1 1 4 4")):
        (root / name).write_text((root / name).read_text() + f"61 {value}\n")
    assert split["2"] == "1" and split["11"] == "0" and labels["2"] == labels["11"]
    shutil.copyfile(root / "images" / images["2"], root / "images" / images["11"])
    report = check_dataset(format="cub", root=str(root), val_fraction=0.0)
    assert report.ok, report.errors
    assert report.duplicate_paths == [{"path": str((root / "images" / images["1"]).resolve()), "ids": ["1", "61"]}]
    assert [(g["ids"], g["splits"]) for g in report.identical_files] == [(["2", "11"], ["test", "train"])]
    assert any("listed 2 times (ids 1, 61)" in w for w in report.warnings)
    assert any("identical content (train and val/test share an image)" in w for w in report.warnings)
    assert check_dataset(format="cub", root=str(root), val_fraction=0.0, hash_files=False).identical_files == []


def test_bounding_boxes_outside_the_image(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 20.0 20.0 15.0 15.0"  # extends past the 32x32 image
    lines[1] = "2 40.0 3.0 5.0 5.0"  # misses it
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    report = check_dataset(format="cub", root=str(root))
    assert report.ok  # boxes are not used without bbox_crop
    assert [(b["id"], b["overlap"]) for b in report.boxes_outside] == [("1", True), ("2", False)]
    assert any("1 bounding boxes extend past their image" in w for w in report.warnings)
    cropped = check_dataset(format="cub", root=str(root), bbox_crop=True)
    assert cropped.errors == [f"bounding box [40.0, 3.0, 5.0, 5.0] of image id 2 lies outside its 32x32 image "
                              f"{(root / 'images' / _manifest(root, 'images.txt')['2']).resolve()} "
                              "(data.bbox_crop would train on an empty crop)"]


def test_class_problems_are_all_listed(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    classes = (root / "classes.txt").read_text()
    (root / "classes.txt").write_text(classes + "5 005.Nothing\n")
    labels = _manifest(root, "image_class_labels.txt")
    split = {i: ("0" if labels[i] == "2" else s) for i, s in _manifest(root, "train_test_split.txt").items()}
    (root / "train_test_split.txt").write_text("".join(f"{i} {s}\n" for i, s in split.items()))
    report = check_dataset(format="cub", root=str(root))
    assert report.empty_classes == ["005.Nothing"]
    assert report.classes_missing_from_train == ["002.Spotted_Red_Crowned_Conebeak"]
    assert report.class_counts["002.Spotted_Red_Crowned_Conebeak"] == {"train": 0, "val": 0, "test": 15}
    assert len(report.errors) == 2 and report.errors[0].startswith("1 of 5 classes have no images at all: '005.Nothing'")
    assert report.errors[1].startswith("classes in val/test but not in train: '002.Spotted_Red_Crowned_Conebeak' "
                                       "(15 test)")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def test_every_manifest_problem_is_listed_and_the_rest_is_checked(toy_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rel = _manifest(root, "images.txt")
    (root / "images.txt").write_text((root / "images.txt").read_text() + "7 x.jpg\n")  # duplicate id
    _edit(root / "train_test_split.txt", "\n12 0\n", "\n12 yes\n")  # bad values: images 12 and 13 left out
    _edit(root / "image_class_labels.txt", "\n13 ", "\n13 x")
    (root / "image_class_labels.txt").write_text((root / "image_class_labels.txt").read_text() + "999 1\n")
    lost = root / "images" / rel["20"]
    lost.unlink()
    expected = ["images.txt line 61: duplicate id 7 (first on line 7)",
                "train_test_split.txt line 12: is_training_image must be 1 or 0, got 'yes'",
                f"image_class_labels.txt line 13: class id 'x{_manifest(toy_root, 'image_class_labels.txt')['13']}' "
                "of image 13 is not an integer",
                "image_class_labels.txt line 61: image id 999 is not in images.txt",
                f"unreadable image {lost.resolve()}: missing file"]
    report = check_dataset(format="cub", root=str(root), hash_files=False)
    assert report.errors == expected
    # the images of the good lines are still decoded and counted; the lost file is among them
    test = [i for i, t in _manifest(toy_root, "train_test_split.txt").items() if t == "0" and i not in ("12", "13")]
    assert report.num_images == 58 and report.split_counts["test"] == len(test)
    assert [(u["id"], u["reason"]) for u in report.unreadable] == [("20", "missing file")]
    assert run_check(DataConfig(format="cub", root=str(root)), output=str(tmp_path / "r.json")) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {e}" for e in report.errors]
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == report.errors
    # with the training flag the lost file is a warning, the manifest problems stay errors
    skipping = check_dataset(format="cub", root=str(root), skip_bad_images=True, hash_files=False)
    assert skipping.errors == report.errors[:-1]
    assert f"unreadable image {lost.resolve()}: missing file" in skipping.warnings


def test_manifests_that_cannot_be_read_are_all_named(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    (root / "train_test_split.txt").unlink()
    (root / "classes.txt").write_bytes((root / "classes.txt").read_bytes() + "5 caf\u00e9\n".encode("latin-1"))
    report = check_dataset(format="cub", root=str(root))
    assert report.errors == [f"missing manifest file {root / 'train_test_split.txt'}",
                             "classes.txt line 5 is not UTF-8 text (byte 0xe9); save the file as UTF-8"]
    assert report.num_images == 0


def test_imagefolder_and_non_image_files(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.new("L", (10 + k, 8), 40 * k).save(tmp_path / split / cls / f"{k}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / "train" / "dog" / "fake.jpg").write_text("not an image")
    report = check_dataset(format="imagefolder", root=str(tmp_path), val_fraction=0.0)
    assert [Path(u["path"]).name for u in report.unreadable] == ["fake.jpg"]
    assert report.unreadable[0]["reason"].startswith("UnidentifiedImageError")
    assert report.modes == {"L": 12} and report.converted == 12
    assert report.sizes == {"width": [10, 11, 12], "height": [8, 8, 8]}
    assert report.split_counts == {"train": 7, "val": 0, "test": 6}


@pytest.mark.parametrize("workers", [1, 4])
def test_result_does_not_depend_on_the_thread_count(toy_root, workers):
    a = check_dataset(format="cub", root=str(toy_root), workers=workers).to_dict()
    b = check_dataset(format="cub", root=str(toy_root), workers=2).to_dict()
    for d in (a, b):
        d.pop("seconds"), d.pop("workers")
    assert a == b
