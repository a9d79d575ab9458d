"""The native-layout readers against the truth their tiny generated copies record.

``fgclf.data.layouts.write_layout`` writes each dataset's files (``.mat`` through scipy, the real
quirks) and, apart from them, ``fgclf_layout.json``: every image's file, class, split and box as
written. The readers never see that file; each test compares what a reader returns with it.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fgclf.data import Records, load_records
from fgclf.data.check import check_dataset, format_report
from fgclf.data.formats import OFFICIAL_COUNTS, detect_format, official_count_notes
from fgclf.data.layouts import write_layout
from fgclf.errors import UserError

# (format, write_layout variant, first class names, boxes)
CASES = [
    ("cub", None, ["001.Bird_0", "002.Bird_1"], True),
    ("nabirds", None, ["Species 0", "Species 1"], True),
    ("stanford_cars", "devkit", ["Make0 Model 0 2010", "Make1 Model 1 2011"], True),
    ("stanford_cars", "mirror", ["Make0 Model 0 2010", "Make1 Model 1 2011"], True),
    ("stanford_cars", "single", ["Make0 Model 0 2010", "Make1 Model 1 2011"], True),
    ("fgvc_aircraft", None, ["Jet 000-A/B", "Jet 100-A/B"], True),
    ("stanford_dogs", None, ["Breed_0", "Breed_1-Terrier"], True),
    ("stanford_dogs", "lists", ["Breed_0", "Breed_1-Terrier"], True),
    ("flowers102", None, ["pink primrose", "hard-leaved pocket orchid"], False),
    ("oxford_pets", None, ["Abyssinian", "American Bulldog"], False),
]
_made: dict = {}


def layout(tmp_path_factory, fmt: str, variant=None, **kw) -> Path:
    """A tiny copy, written once per session per arguments (tests that change it take a copy)."""
    key = (fmt, variant, tuple(sorted(kw.items())))
    if key not in _made:
        small = dict(train_per_class=1, val_per_class=1, test_per_class=1, image_size=32) if fmt == "flowers102" else {}
        root = tmp_path_factory.mktemp(f"{fmt}_{variant}")
        _made[key] = write_layout(fmt, root, variant=variant, **{**small, **kw})
    return _made[key]


def copy_of(tmp_path, root: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(root, out)
    return out


def truth(root: Path) -> dict:
    return json.loads((root / "fgclf_layout.json").read_text())


def check_against_truth(rec: Records, root: Path, boxes: bool) -> None:
    want = {str((root / f).resolve()): (c, split, box) for f, c, split, box in truth(root)["images"]}
    assert sorted(rec.items) == sorted(want)
    for item, label, split, k in zip(rec.items, rec.labels, rec.splits, range(len(rec))):
        c, true_split, box = want[item]
        assert (label, split) == (c, true_split), item
        if boxes:  # stored as integer corners by the .mat/VOC layouts: within a pixel
            assert rec.bboxes[k] == pytest.approx(box, abs=1.0), item
    assert len(set(rec.image_ids)) == len(rec)


@pytest.mark.parametrize("fmt,variant,names,boxes", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_reader_matches_what_was_written(tmp_path_factory, fmt, variant, names, boxes):
    root = layout(tmp_path_factory, fmt, variant)
    rec = load_records(format=fmt, root=str(root), bbox_crop=boxes, val_fraction=0)
    assert rec.format == fmt
    assert rec.class_names[:2] == names
    assert len(rec.class_names) == truth(root)["num_classes"]
    check_against_truth(rec, root, boxes)
    # auto picks the same reader and says so
    auto = load_records(format="auto", root=str(root), val_fraction=0)
    assert auto.format == fmt and auto.notes[0].startswith(f"data.format auto: {fmt} (found ")
    assert (auto.items, auto.labels, auto.splits) == (rec.items, rec.labels, rec.splits)


def test_levels(tmp_path_factory):
    """Coarse levels: Aircraft's family/manufacturer, NABirds' parent node, Pets' species."""
    root = layout(tmp_path_factory, "fgvc_aircraft", None, num_classes=8)
    rec = load_records(format="fgvc_aircraft", root=str(root), val_fraction=0)
    assert rec.levels["family"] == ([f"Jet {k} family" for k in range(4)], [c // 2 for c in range(8)])
    assert rec.levels["manufacturer"] == (["Maker 0", "Maker 1"], [c // 4 for c in range(8)])
    fam = load_records(format="fgvc_aircraft", root=str(root), val_fraction=0, label_level="family")
    assert len(fam.class_names) == 4 and set(fam.levels) == {"manufacturer"}
    assert fam.labels == [rec.levels["family"][1][k] for k in rec.labels]  # same image order
    maker = load_records(format="fgvc_aircraft", root=str(root), val_fraction=0, label_level="manufacturer")
    assert maker.labels == [c // 4 for c in rec.labels] and maker.levels == {}
    nab = load_records(format="nabirds", root=str(layout(tmp_path_factory, "nabirds")), val_fraction=0)
    assert nab.levels == {"parent": (["Family 10", "Family 11"], [0, 0, 1, 1])}
    assert nab.class_ids == ["300", "307", "314", "321"]
    pets = load_records(format="oxford_pets", root=str(layout(tmp_path_factory, "oxford_pets")), val_fraction=0)
    assert pets.levels == {"species": (["cat", "dog"], [0, 1, 0, 1])}


def test_official_protocol_splits(tmp_path_factory):
    """Aircraft/Flowers keep their own val split; merge_val moves it into train."""
    root = layout(tmp_path_factory, "fgvc_aircraft")
    rec = load_records(format="fgvc_aircraft", root=str(root), val_fraction=0.5)
    assert Counter(rec.splits) == {"train": 12, "val": 4, "test": 8}  # the shipped val, not a carved one
    merged = load_records(format="fgvc_aircraft", root=str(root), merge_val=True, val_fraction=0)
    assert Counter(merged.splits) == {"train": 16, "test": 8}
    flowers = load_records(format="flowers102", root=str(layout(tmp_path_factory, "flowers102")), val_fraction=0)
    assert Counter(flowers.splits) == {"train": 102, "val": 102, "test": 102}


def _official_records(fmt: str, drop_test: int = 0) -> Records:
    spec = OFFICIAL_COUNTS[fmt]
    n_classes = spec["classes"] if isinstance(spec["classes"], int) else spec["classes"]["variant"]
    splits = [s for s, n in spec["splits"].items() for _ in range(n - (drop_test if s == "test" else 0))]
    labels = [k % n_classes for k in range(len(splits))]
    return Records(list(range(len(splits))), labels, [str(k) for k in range(len(splits))], splits,
                   [str(c) for c in range(n_classes)])


# the published protocols, written out here (not read from OFFICIAL_COUNTS): train/val/test images, classes
PUBLISHED = {"cub": ({"train": 5994, "test": 5794}, 200), "nabirds": ({"train": 23929, "test": 24633}, 555),
             "stanford_cars": ({"train": 8144, "test": 8041}, 196),
             "fgvc_aircraft": ({"train": 3334, "val": 3333, "test": 3333}, 100),
             "stanford_dogs": ({"train": 12000, "test": 8580}, 120),
             "flowers102": ({"train": 1020, "val": 1020, "test": 6149}, 102),
             "oxford_pets": ({"train": 3680, "test": 3669}, 37)}


def test_official_counts_are_the_published_ones():
    assert set(OFFICIAL_COUNTS) == set(PUBLISHED)
    for fmt, (splits, classes) in PUBLISHED.items():
        spec = OFFICIAL_COUNTS[fmt]
        assert spec["splits"] == splits
        assert (spec["classes"] if isinstance(spec["classes"], int) else spec["classes"]["variant"]) == classes
    assert OFFICIAL_COUNTS["fgvc_aircraft"]["classes"] == {"variant": 100, "family": 70, "manufacturer": 30}


@pytest.mark.parametrize("fmt", sorted(OFFICIAL_COUNTS))
def test_official_counts(fmt):
    assert official_count_notes(fmt, _official_records(fmt)) == []
    note, = official_count_notes(fmt, _official_records(fmt, drop_test=1))
    want = OFFICIAL_COUNTS[fmt]["splits"]["test"]
    assert f"test {want - 1} images (official {want})" in note and "\n" not in note
    assert "train" not in note  # only the difference is named


def test_incomplete_copy_warns_in_training_and_check(tmp_path_factory, capsys):
    from fgclf.config import DataConfig
    from fgclf.data import load_records_from_config

    root = layout(tmp_path_factory, "stanford_dogs")
    data = DataConfig(format="stanford_dogs", root=str(root), val_fraction=0)
    load_records_from_config(data)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: this stanford_dogs copy is not the official protocol: train 12 images (official "
                   "12000); test 8 images (official 8580); 4 classes with images (official 120); results on it "
                   "are not comparable with published numbers"]
    report = check_dataset(DataConfig(format="auto", root=str(root), val_fraction=0), hash_files=False)
    assert report.ok and report.format == "stanford_dogs (auto)"
    assert any("official 8580" in w for w in report.warnings)
    assert "official 8580" in format_report(report)


@pytest.mark.parametrize("fmt,variant,remove,named", [
    ("stanford_cars", "devkit", "devkit/cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat"),
    ("stanford_cars", "mirror", "car_devkit/devkit/cars_meta.mat", "cars_meta.mat"),
    ("stanford_cars", "mirror", "cars_test_annos_withlabels (1).mat", "cars_test_annos_withlabels.mat"),
    ("fgvc_aircraft", None, "fgvc-aircraft-2013b/data/images_family_test.txt", "images_family_test.txt"),
    ("stanford_dogs", None, "test_list.mat", "test_list.mat"),
    ("flowers102", None, "setid.mat", "setid.mat"),
    ("oxford_pets", None, "annotations/test.txt", "test.txt"),
    ("nabirds", None, "hierarchy.txt", "hierarchy.txt"),
])
def test_missing_annotation_file_is_one_line_error(tmp_path_factory, tmp_path, fmt, variant, remove, named):
    root = copy_of(tmp_path, layout(tmp_path_factory, fmt, variant))
    (root / remove).unlink()
    with pytest.raises(UserError, match="missing annotation file .*" + named.replace(".", r"\.")) as err:
        load_records(format=fmt, root=str(root), val_fraction=0)
    assert "\n" not in str(err.value)


def test_missing_image_file(tmp_path_factory, tmp_path):
    root = copy_of(tmp_path, layout(tmp_path_factory, "stanford_cars", "mirror"))
    gone = root / "cars_test/cars_test/00002.jpg"
    gone.unlink()
    with pytest.raises(UserError, match=f"a listed image is missing: {gone}.*--data.skip_bad_images"):
        load_records(format="stanford_cars", root=str(root), val_fraction=0)
    kept = load_records(format="stanford_cars", root=str(root), val_fraction=0, keep_missing=True)
    assert str(gone) in kept.items  # the training scripts then skip it as a bad image


def test_user_errors(tmp_path_factory, tmp_path):
    with pytest.raises(UserError, match="flowers102 has no bounding boxes"):
        load_records(format="flowers102", root=str(layout(tmp_path_factory, "flowers102")), bbox_crop=True)
    with pytest.raises(UserError, match="label_level applies to fgvc_aircraft only"):
        load_records(format="stanford_dogs", root=str(layout(tmp_path_factory, "stanford_dogs")), label_level="family")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no known dataset layout"):
        detect_format(tmp_path / "empty")
    with pytest.raises(UserError, match="not empty"):
        write_layout("cub", layout(tmp_path_factory, "cub"))


def test_auto_falls_back_to_imagefolder(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    assert detect_format(tmp_path) == ("imagefolder", "found class folders of images")


@pytest.mark.parametrize("fmt,variant", [("stanford_cars", "devkit"), ("stanford_cars", "single"),
                                         ("stanford_dogs", None)])
def test_one_entry_mat_files(tmp_path, fmt, variant):
    """scipy's squeeze_me turns a one-entry cell into a bare string and a one-entry struct array into a
    0-d one: one class with one train and one test image still reads right (and one class name is
    not split into letters)."""
    root = write_layout(fmt, tmp_path / "one", variant=variant, num_classes=1, train_per_class=1, test_per_class=1)
    rec = load_records(format=fmt, root=str(root), val_fraction=0, bbox_crop=True)
    assert len(rec.class_names) == 1 and len(rec.class_names[0]) > 1
    check_against_truth(rec, root, boxes=True)


def test_broken_annotations_are_one_line_errors(tmp_path_factory, tmp_path):
    from scipy.io import savemat

    root = copy_of(tmp_path, layout(tmp_path_factory, "stanford_dogs"))
    savemat(str(root / "test_list.mat"), {"file_list": np.empty((0, 1), dtype=object), "labels": np.empty((0, 1))})
    with pytest.raises(UserError, match="test_list.mat: 'file_list' is empty"):
        load_records(format="stanford_dogs", root=str(root), val_fraction=0)
    shutil.rmtree(root)
    root = copy_of(tmp_path, layout(tmp_path_factory, "stanford_dogs"))
    voc = next(p for p in (root / "Annotation").rglob("*") if p.is_file())
    voc.write_text(voc.read_text().replace("<xmin>", "<xmin>x"))
    with pytest.raises(UserError, match="without numeric xmin"):
        load_records(format="stanford_dogs", root=str(root), val_fraction=0, bbox_crop=True)


def test_register_format_adds_a_reader(tmp_path_factory, monkeypatch):
    """A registered reader is a format of load_records, with its boxes and official counts checked."""
    from fgclf.data import formats, list_formats, read_cub, register_format

    monkeypatch.setattr(formats, "READERS", dict(formats.READERS))
    monkeypatch.setattr(formats, "OFFICIAL_COUNTS", dict(formats.OFFICIAL_COUNTS))
    monkeypatch.setattr(formats, "BOXES", set(formats.BOXES))
    root = layout(tmp_path_factory, "nabirds")
    register_format("my_birds", lambda r, bbox, keep, problems, level: read_cub(r, bbox_crop=bbox),
                    boxes=True, official={"splits": {"train": 12, "test": 9}, "classes": 4})
    assert "my_birds" in list_formats()
    rec = load_records(format="my_birds", root=str(root), bbox_crop=True, val_fraction=0)
    check_against_truth(rec, root, boxes=True)
    assert rec.format == "my_birds" and rec.notes == [
        "warning: this my_birds copy is not the official protocol: test 8 images (official 9); results on it are "
        "not comparable with published numbers"]
