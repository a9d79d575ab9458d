"""Dataset readers, splits and image decoding, checked against hand-built references."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgclf.data import (create_dataset, find_bad_images, load_records, read_cub, read_hf, read_imagefolder,
                        split_summary, stratified_holdout, to_rgb)
from fgclf.errors import UserError


def _write_cub(root: Path, rows: list[tuple[int, str, int, int]], classes: list[str], shuffle: bool = True):
    """rows: (image_id, class_dir/name.png, class_id 1-based, is_train); images get a colour per id."""
    for image_id, rel, _, _ in rows:
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10), (image_id * 10 % 256, 0, 0)).save(path)
    order = list(rows)
    if shuffle:
        random.Random(0).shuffle(order)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in order))
    random.Random(1).shuffle(order)
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in order), )
    random.Random(2).shuffle(order)
    (root / "train_test_split.txt").write_text("\ufeff" + "".join(f"{i} {t}\r\n" for i, _, _, t in order))
    (root / "classes.txt").write_text("".join(f"{k + 1} {name}\n" for k, name in enumerate(classes)))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 2.0 1.0 8.0 5.0\n" for i, _, _, _ in order))


@pytest.fixture
def cub(tmp_path) -> Path:
    rows = [(i, f"{'001.A' if i % 2 else '002.B'}/img {i}.png", 1 if i % 2 else 2, int(i <= 8)) for i in range(1, 13)]
    _write_cub(tmp_path, rows, ["001.A", "002.B"])
    return tmp_path


def test_cub_join_on_id_any_order_one_based(cub):
    rec = read_cub(cub)
    assert rec.class_names == ["001.A", "002.B"]
    assert rec.image_ids == [str(i) for i in range(1, 13)]  # sorted by id whatever the file order
    assert rec.labels == [0 if i % 2 else 1 for i in range(1, 13)]
    assert rec.splits == ["train" if i <= 8 else "test" for i in range(1, 13)]
    assert all(Path(p).name == f"img {i}.png" for i, p in zip(range(1, 13), rec.items))  # spaces in names
    assert rec.class_ids == ["1", "2"] and split_summary(rec)["class_ids"] == ["1", "2"]


def test_cub_bbox_crop(cub):
    ds = create_dataset(format="cub", root=str(cub), split="test", bbox_crop=True, val_fraction=0)
    img, _ = ds[0]
    assert img.size == (8, 5)


def test_cub_missing_id_in_labels(cub):
    lines = (cub / "image_class_labels.txt").read_text().splitlines()
    (cub / "image_class_labels.txt").write_text("\n".join(ln for ln in lines if not ln.startswith("5 ")) + "\n")
    with pytest.raises(UserError, match="image id 5 .* missing in image_class_labels.txt"):
        read_cub(cub)


def test_cub_path_outside_root_is_rejected(cub):
    (cub / "images.txt").write_text("1 ../../etc/passwd\n")
    with pytest.raises(UserError, match="leaves the dataset root"):
        read_cub(cub)


# NABirds: classes.txt lists every hierarchy node (ids from 0, not 1..N); images use leaf ids only
NABIRDS_NODES = {0: ("Birds", None), 1: ("Perching Birds", 0), 22: ("Hawks", 0), 295: ("Bewick's Wren", 1),
                 817: ("Red-tailed Hawk (Adult)", 22), 818: ("Red-tailed Hawk (Immature)", 22),
                 1010: ("Zone-tailed Hawk", 22)}


def _write_nabirds(root: Path, leaves=(1010, 295, 817, 295, 1010, 817, 1010, 295, 817, 295, 817, 1010)) -> list:
    """A NABirds-layout folder: UUID image ids, zero-padded class folders, unpadded class ids in
    image_class_labels.txt, shuffled lines; returns [(image id, class id, is_train)] in id order."""
    rows = [(f"{k:08x}-21dc-4d0c-bfe1-4cae3c85c829", c, int(k < 8)) for k, c in enumerate(leaves)]
    for image_id, c, _ in rows:
        (root / "images" / f"{c:04d}").mkdir(parents=True, exist_ok=True)
        path = root / "images" / f"{c:04d}" / f"{image_id.replace('-', '')}.jpg"
        Image.new("RGB", (12, 10), (c % 256, 0, 0)).save(path)
    order = list(rows)
    random.Random(0).shuffle(order)
    (root / "images.txt").write_text("".join(f"{i} {c:04d}/{i.replace('-', '')}.jpg\n" for i, c, _ in order))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in order))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in order))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 1 1 8 6\n" for i, _, _ in order))
    (root / "classes.txt").write_text("".join(f"{c} {name}\n" for c, (name, _) in NABIRDS_NODES.items()))
    (root / "hierarchy.txt").write_text("".join(f"{c} {parent}\n" for c, (_, parent) in NABIRDS_NODES.items()
                                                if parent is not None))
    return rows


@pytest.mark.parametrize("hierarchy", [True, False])
def test_nabirds_leaf_ids_are_numbered_0_to_n_and_the_original_ids_kept(tmp_path, hierarchy):
    rows = _write_nabirds(tmp_path)
    if not hierarchy:  # the ids alone (0..1010, not 1..N) say it is not CUB's numbering
        (tmp_path / "hierarchy.txt").unlink()
    rec = read_cub(tmp_path, bbox_crop=True)
    used = [295, 817, 1010]  # the leaves images use, in id order; 818 has no images, internal nodes none
    assert rec.class_ids == ["295", "817", "1010"]
    assert rec.class_names == ["Bewick's Wren", "Red-tailed Hawk (Adult)", "Zone-tailed Hawk"]
    assert rec.image_ids == [i for i, _, _ in rows]
    assert rec.labels == [used.index(c) for _, c, _ in rows]
    assert rec.splits == ["train" if t else "test" for _, _, t in rows]
    split = load_records(format="cub", root=str(tmp_path), val_fraction=0.0)
    summary = split_summary(split)
    assert summary["class_ids"] == ["295", "817", "1010"]
    assert summary["train"] == [i for i, _, t in rows if t] and summary["test"] == [i for i, _, t in rows if not t]


def test_nabirds_image_of_a_class_missing_from_classes_txt_names_the_line(tmp_path):
    _write_nabirds(tmp_path)
    lines = (tmp_path / "image_class_labels.txt").read_text().splitlines()
    lines[4] = lines[4].split()[0] + " 333"
    (tmp_path / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^image_class_labels.txt line 5: class id 333 of image "
                                        rf"{lines[4].split()[0]} is not in classes.txt$"):
        read_cub(tmp_path)


def _nabirds_copy(toy_root: Path, root: Path) -> Path:
    """The toy data with NABirds-style class ids (toy 1, 2, 3, 4 -> 817, 22, 1010, 295, a root
    node 0 and hierarchy.txt) and the file of image id 1 lost; returns that file's path."""
    import shutil

    shutil.copytree(toy_root, root)
    to_nabirds = {"1": 817, "2": 22, "3": 1010, "4": 295}  # toy class id -> NABirds-style leaf id
    names = dict(ln.split(" ", 1) for ln in (root / "classes.txt").read_text().splitlines())
    (root / "classes.txt").write_text("0 Birds\n" + "".join(f"{to_nabirds[c]} {n}\n" for c, n in names.items()))
    (root / "hierarchy.txt").write_text("".join(f"{v} 0\n" for v in to_nabirds.values()))
    labels = dict(ln.split(" ", 1) for ln in (root / "image_class_labels.txt").read_text().splitlines())
    (root / "image_class_labels.txt").write_text("".join(f"{i} {to_nabirds[c]}\n" for i, c in labels.items()))
    lost = root / "images" / dict(ln.split(" ", 1) for ln in (root / "images.txt").read_text().splitlines())["1"]
    lost.unlink()
    return lost


def test_nabirds_copy_with_a_lost_file_loads_like_training_does(toy_root, tmp_path):
    """What train_classifier.py writes: splits.json (split_summary) with the original class ids,
    bad_images.txt with the lost file; the labels follow the ids' order, not the toy's."""
    from types import SimpleNamespace

    from fgclf.data import load_records_from_config

    lost = _nabirds_copy(toy_root, tmp_path / "data")
    toy = read_cub(toy_root)
    toy_label = dict(zip(toy.image_ids, toy.labels))
    cfg = SimpleNamespace(format="cub", root=str(tmp_path / "data"), bbox_crop=False, val_fraction=0.15,
                          test_fraction=0.2, split_seed=0, num_folds=0, fold=0, verify_images="none",
                          skip_bad_images=True, toy_num_classes=2, toy_train_per_class=1, toy_test_per_class=1,
                          toy_image_size=8, toy_seed=0)
    rec, bad = load_records_from_config(cfg)
    assert bad == [(str(lost.resolve()), "missing file")] and "1" not in rec.image_ids and len(rec) == 59
    assert split_summary(rec)["class_ids"] == ["22", "295", "817", "1010"]
    by_toy = {1: 2, 2: 0, 3: 3, 4: 1}  # toy class id -> rank of its NABirds id among 22, 295, 817, 1010
    assert rec.labels == [by_toy[toy_label[i] + 1] for i in rec.image_ids]


@pytest.mark.slow
def test_nabirds_layout_trains_and_writes_the_original_ids_and_missing_files(toy_root, tmp_path):
    """train_classifier.py on the NABirds-style copy: splits.json maps labels to the original ids,
    bad_images.txt names the lost file (about 15 s; 60 s on a busy 2-core machine)."""
    import json

    from conftest import TINY_ARGS, run_script

    root = tmp_path / "data"
    lost = _nabirds_copy(toy_root, root)
    out = tmp_path / "run"
    proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(root), *TINY_ARGS,
                                              "--train.epochs", "1", "--train.output_dir", str(out),
                                              "--data.skip_bad_images", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["class_ids"] == ["22", "295", "817", "1010"]
    assert "1" not in splits["train"] + splits.get("val", []) + splits["test"]
    assert (out / "bad_images.txt").read_text() == f"{lost.resolve()}\tmissing file\n"


def _folder(root: Path, splits: bool) -> None:
    for split in (["train", "val", "test"] if splits else [""]):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(6):
                Image.new("L", (8, 8), k * 30).save(d / f"{k}.png")
    (root / ("train" if splits else "") / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_with_and_without_split_folders(tmp_path):
    _folder(tmp_path / "a", splits=True)
    rec = read_imagefolder(tmp_path / "a")
    assert rec.class_names == ["cat", "dog"] and len(rec) == 36
    assert sorted(set(rec.splits)) == ["test", "train", "val"]
    _folder(tmp_path / "b", splits=False)
    rec = load_records(format="imagefolder", root=str(tmp_path / "b"), val_fraction=0.2, test_fraction=0.35,
                       split_seed=3)
    counts = {s: sum(1 for x in rec.splits if x == s) for s in ("train", "val", "test")}
    assert counts == {"test": 4, "val": 2, "train": 6}  # per class: round(.35*6)=2 test, round(.2*4)=1 val
    again = load_records(format="imagefolder", root=str(tmp_path / "b"), val_fraction=0.2, test_fraction=0.35,
                         split_seed=3)
    assert again.splits == rec.splits


def test_hf_imagefolder_matches_folder_reader(tmp_path):
    pytest.importorskip("datasets")
    _folder(tmp_path / "a", splits=True)
    (tmp_path / "a" / "train" / "cat" / "notes.txt").unlink()
    hf = read_hf(str(tmp_path / "a"))
    folder = read_imagefolder(tmp_path / "a")
    assert hf.class_names == folder.class_names
    count = lambda r: sorted((s, lab) for s, lab in zip(r.splits, r.labels))  # noqa: E731
    assert count(hf) == count(folder)
    ds = create_dataset(records=hf, split="val")
    img, label = ds[0]
    assert img.mode == "RGB" and label in (0, 1)


def test_stratified_holdout_is_stratified_and_seeded():
    labels = [0] * 20 + [1] * 10 + [2] * 3
    mask = stratified_holdout(labels, 0.2, seed=5)
    assert [int(mask[np.array(labels) == c].sum()) for c in range(3)] == [4, 2, 1]
    assert np.array_equal(mask, stratified_holdout(labels, 0.2, seed=5))
    assert not np.array_equal(mask, stratified_holdout(labels, 0.2, seed=6))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "I", "F", "LA", "1"])
def test_to_rgb_every_mode(mode):
    base = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    if mode == "I;16":
        img = Image.frombytes("I;16", (8, 8), (np.arange(64, dtype="<u2").reshape(8, 8) * 1000).tobytes())
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    arr = np.asarray(out)
    if mode in ("L", "P", "RGBA", "LA", "I", "F"):
        np.testing.assert_array_equal(arr[..., 0], np.asarray(base))  # values kept, not clipped
    if mode == "I;16":  # 16-bit range scaled down (65535 -> 255), not clipped to white
        expected = np.round(np.arange(64).reshape(8, 8) * 1000 / 257.0)
        np.testing.assert_array_equal(arr[..., 0], expected)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 255, 255))
    assert list(to_rgb(img).getdata()) == [(255, 255, 255), (0, 0, 255)]


def test_find_bad_images(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, quality=90)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")
    bad = dict(find_bad_images([str(p) for p in (good, trunc, empty, text)]))
    assert set(bad) == {str(trunc), str(empty), str(text)}
    assert bad[str(empty)] == "zero-byte file"


def test_kfold_partitions_train_and_leaves_test_alone(tmp_path):
    _folder(tmp_path / "b", splits=False)
    base = dict(format="imagefolder", root=str(tmp_path / "b"), test_fraction=0.35, split_seed=3)
    folds = [load_records(**base, num_folds=2, fold=k) for k in range(2)]
    tests = [[i for i, s in zip(r.image_ids, r.splits) if s == "test"] for r in folds]
    vals = [{i for i, s in zip(r.image_ids, r.splits) if s == "val"} for r in folds]
    assert tests[0] == tests[1]  # the test split does not depend on the fold
    assert vals[0].isdisjoint(vals[1]) and len(vals[0] | vals[1]) == 8  # the folds cover train exactly
    labels = dict(zip(folds[0].image_ids, folds[0].labels))
    assert sorted(labels[i] for i in vals[0]) == [0, 0, 1, 1]  # stratified
    with pytest.raises(UserError, match="data.fold must be in 0..1"):
        load_records(**base, num_folds=2, fold=2)
    with pytest.raises(UserError, match="needs >= 5 train images per class"):
        load_records(**base, num_folds=5, fold=0)


def test_hf_plain_labels_are_numbered_by_sorted_value(monkeypatch):
    datasets = pytest.importorskip("datasets")
    img = Image.new("RGB", (4, 4))
    table = {"image": [img] * 4, "label": [10, 2, 10, 7]}  # ints, not 0..N-1, not a ClassLabel
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                                "test": datasets.Dataset.from_dict({"image": [img], "label": [7]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dsd)
    rec = read_hf("someone/some-dataset")
    assert rec.class_names == ["2", "7", "10"]  # numeric order, not "10" < "2"
    assert rec.labels == [2, 0, 2, 1, 1]
    words = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [img] * 2, "label": ["wren", "auk"]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: words)
    rec = read_hf("someone/words")
    assert rec.class_names == ["auk", "wren"] and rec.labels == [1, 0]
