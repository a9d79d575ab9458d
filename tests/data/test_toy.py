"""Tests for the procedural fine-grained toy dataset (fgclf.data.toy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgclf.data import toy
from fgclf.errors import UserError

TINY = dict(num_classes=4, train_per_class=2, test_per_class=1, image_size=48, seed=0)
REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _table(root: Path, name: str) -> dict[int, list[str]]:
    rows = [line.split() for line in (root / name).read_text().splitlines()]
    return {int(r[0]): r[1:] for r in rows}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return toy.generate_toy_cub(tmp_path_factory.mktemp("toy") / "cub", **TINY)


def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    again = toy.generate_toy_cub(tmp_path / "again", **TINY)
    other = toy.generate_toy_cub(tmp_path / "other", **{**TINY, "seed": 1})
    ref, same, diff = _files(tiny), _files(again), _files(other)
    assert len(ref) == 4 * 3 + 6 and same == ref
    jpgs = [k for k in ref if k.endswith(".jpg")]
    assert sorted(diff) == sorted(ref)  # same layout and names ...
    assert all(diff[k] != ref[k] for k in jpgs)  # ... but every image is new
    assert diff["bounding_boxes.txt"] != ref["bounding_boxes.txt"]


def test_images_do_not_depend_on_generation_order(tiny, tmp_path):
    """Per-image seeding: more classes / test images leave the existing images unchanged."""
    bigger = toy.generate_toy_cub(tmp_path / "b", **{**TINY, "num_classes": 5, "test_per_class": 2})
    ref, big = _files(tiny), _files(bigger)
    for name, data in ref.items():
        if name.endswith(".jpg"):
            assert big[name] == data, name
    assert len([k for k in big if k.endswith(".jpg")]) == 5 * 4


def test_manifests_are_consistent(tiny):
    images, labels = _table(tiny, "images.txt"), _table(tiny, "image_class_labels.txt")
    split, boxes = _table(tiny, "train_test_split.txt"), _table(tiny, "bounding_boxes.txt")
    classes = _table(tiny, "classes.txt")
    n = 4 * 3
    assert list(images) == list(range(1, n + 1))
    assert set(labels) == set(split) == set(boxes) == set(images)
    assert sorted(classes) == [1, 2, 3, 4]
    meta = json.loads((tiny / "toy_meta.json").read_text())
    assert meta["params"] == TINY and meta["format_version"] == toy.FORMAT_VERSION
    assert [c["name"] for c in meta["classes"]] == [v[0].split(".", 1)[1] for v in classes.values()]
    per_class = {c: [0, 0] for c in classes}
    for i, (rel,) in images.items():
        (label,) = labels[i]
        folder = rel.split("/")[0]
        assert folder == classes[int(label)][0] and folder.startswith(f"{int(label):03d}.")
        with Image.open(tiny / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)
        per_class[int(label)][int(split[i][0])] += 1
        x, y, w, h = map(float, boxes[i])
        assert 0 <= x and 0 <= y and w >= 4 and h >= 4 and x + w <= 48 and y + h <= 48
    assert all(v == [1, 2] for v in per_class.values())  # [test, train] per class


def test_bounding_box_holds_the_bird(tiny):
    """Compare each JPEG with the same scene rendered without the bird: it differs much more
    inside the box than outside (JPEG/blur noise only); the rendered box matches the file."""
    meta = json.loads((tiny / "toy_meta.json").read_text())
    images, labels = _table(tiny, "images.txt"), _table(tiny, "image_class_labels.txt")
    boxes = _table(tiny, "bounding_boxes.txt")
    for i, (rel,) in images.items():
        ci = int(labels[i][0]) - 1
        k = int(rel.rsplit("_", 1)[1].split(".")[0])
        attrs = meta["classes"][ci]["attributes"]
        with_bird, box = toy.render_toy_sample(0, ci, k, attrs, 48)
        empty, _ = toy.render_toy_sample(0, ci, k, attrs, 48, draw_bird=False)
        np.testing.assert_allclose(box, list(map(float, boxes[i])), atol=0.06)
        on = np.asarray(Image.open(tiny / "images" / rel), dtype=np.float32)
        assert np.abs(on - np.asarray(with_bird, dtype=np.float32)).mean() < 6  # the file is the render
        diff = np.abs(on - np.asarray(empty, dtype=np.float32)).mean(-1)
        x, y, w, h = (int(round(v)) for v in box)
        inside = np.zeros(diff.shape, dtype=bool)
        inside[y:y + h, x:x + w] = True
        d_in, d_out = diff[inside].mean(), diff[~inside].mean()  # measured: >= 2.8x, >= +5.2
        assert d_in > 2 * d_out and d_in > d_out + 3, (rel, d_in, d_out)


def _clean_scene(class_index: int, k: int, **changes) -> dict:
    """The scene of image k of a class, optionally without blur/JPEG pass/occluder."""
    scene = toy._sample_scene(np.random.default_rng([0, class_index, k]))
    scene.update(changes)
    return scene


def test_bounding_box_is_tight():
    """Without blur, JPEG pass and occluder, the pixels the bird changes span exactly its box."""
    for ci, (_, attrs) in enumerate(toy.toy_classes(4)):
        for k in range(1, 11):
            scene = _clean_scene(ci, k, blur=0.0, jpeg=0, occluder=None)
            with_bird, (x, y, w, h) = toy._render_image(attrs, scene, 48)
            empty, _ = toy._render_image(attrs, scene, 48, draw_bird=False)
            changed = (np.asarray(with_bird) != np.asarray(empty)).any(-1)
            rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            found = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            np.testing.assert_allclose(found, (x, y, x + w, y + h), atol=2.0)  # measured <= 1.7


def test_one_attribute_changes_a_small_local_part_of_the_image():
    """Same scene, one attribute switched: the change is visible, inside the bird's box, and
    covers a small part of the image (measured at 96 px: <= 4% per image, ~1% on average)."""
    vocab = toy.list_toy_attributes()
    plain = {a: v[0] for a, v in vocab.items()}
    for attr, values in vocab.items():
        for value in values[1:]:
            other, total = {**plain, attr: value}, 0
            for k in range(1, 9):
                scene = _clean_scene(0, k, blur=0.0, jpeg=0)
                a, box_a = toy._render_image(plain, scene, 64)
                b, box_b = toy._render_image(other, scene, 64)
                changed = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(-1) > 20
                x0, y0 = (int(min(box_a[i], box_b[i])) for i in (0, 1))
                x1, y1 = (int(max(box_a[i] + box_a[i + 2], box_b[i] + box_b[i + 2])) + 1 for i in (0, 1))
                inside = np.zeros_like(changed)
                inside[y0:y1, x0:x1] = True
                assert not changed[~inside].any() and changed.mean() < 0.06, (attr, value, k)
                total += int(changed.sum())
            assert total >= 10, (attr, value, total)


def test_occluder_covers_at_most_a_fifth_of_the_bird():
    plain = {a: v[0] for a, v in toy.list_toy_attributes().items()}
    covered = []
    for k in range(1, 121):
        info: dict = {}
        toy._render_image(plain, _clean_scene(1, k), 48, info=info)
        covered.append(info["occluded"])
    covered = np.asarray(covered)
    assert 0.15 < (covered > 0).mean() < 0.45  # about 30% of the images
    assert covered.max() <= 0.2 and covered[covered > 0].mean() > 0.04


def test_ensure_regenerates_only_when_params_change(tmp_path, monkeypatch):
    monkeypatch.setenv("FGCLF_CACHE", str(tmp_path / "cache"))
    root = toy.ensure_toy_cub(**TINY)
    assert root == toy.default_toy_root(TINY) != toy.default_toy_root()
    assert toy.default_toy_root() == tmp_path / "cache" / "datasets" / "toy_cub"  # the default parameters
    assert root.parent == toy.default_toy_root().parent and root.name.startswith("toy_cub_")
    # other parameters get their own folder: they never regenerate the default dataset under a reader
    assert toy.default_toy_root({**TINY, "seed": 1}) not in (root, toy.default_toy_root())
    meta, img = root / "toy_meta.json", next((root / "images").rglob("*.jpg"))
    os.utime(meta, ns=(1, 1))  # any regeneration would write a fresh mtime
    os.utime(img, ns=(1, 1))
    assert toy.ensure_toy_cub(root, **TINY) == root
    assert (meta.stat().st_mtime_ns, img.stat().st_mtime_ns) == (1, 1)
    toy.ensure_toy_cub(root, **{**TINY, "seed": 3})
    assert meta.stat().st_mtime_ns > 1 and img.stat().st_mtime_ns > 1
    assert json.loads(meta.read_text())["params"]["seed"] == 3
    (root / "bounding_boxes.txt").unlink()  # incomplete: regenerated even with the same params
    toy.ensure_toy_cub(root, **{**TINY, "seed": 3})
    assert (root / "bounding_boxes.txt").exists()


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    real, calls = toy.render_toy_sample, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "render_toy_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        toy.generate_toy_cub(tmp_path / "cub", **TINY)
    assert list(tmp_path.iterdir()) == []  # neither root nor a temporary sibling
    monkeypatch.setattr(toy, "render_toy_sample", real)
    old = _files(toy.generate_toy_cub(tmp_path / "cub", **TINY))
    calls.clear()
    monkeypatch.setattr(toy, "render_toy_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        toy.generate_toy_cub(tmp_path / "cub", **{**TINY, "seed": 5}, overwrite=True)
    assert _files(tmp_path / "cub") == old and [p.name for p in tmp_path.iterdir()] == ["cub"]


def test_refuses_to_replace_a_folder_that_is_not_a_toy_dataset(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        toy.generate_toy_cub(root, **TINY)
    for call in (lambda: toy.generate_toy_cub(root, overwrite=True, **TINY),
                 lambda: toy.ensure_toy_cub(root, **TINY)):
        with pytest.raises(UserError, match="not a toy dataset"):
            call()
    assert [p.name for p in root.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("bad, match", [
    (dict(num_classes=1), "num_classes must be >= 2"),
    (dict(num_classes=10_000), "num_classes must be <="),
    (dict(image_size=16), "image_size must be >= 32"),
    (dict(train_per_class=0), "train_per_class must be >= 1"),
    (dict(test_per_class=0), "test_per_class must be >= 1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(colour=3), "unknown toy dataset parameter"),
])
def test_invalid_params_raise_one_line_user_error(tmp_path, bad, match):
    with pytest.raises(UserError, match=match) as err:
        toy.ensure_toy_cub(tmp_path / "x", **bad)
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("n", [4, 12, 288])
def test_classes_are_unique_combinations_with_one_attribute_neighbours(n):
    vocab = toy.list_toy_attributes()
    classes = toy.toy_classes(n)
    combos = [tuple(a[k] for k in vocab) for _, a in classes]
    names = [name for name, _ in classes]
    assert len(set(combos)) == len(set(names)) == n
    assert all(a[k] in vocab[k] for _, a in classes for k in vocab)
    assert all(name.isascii() and name.replace("_", "").isalnum() for name in names)
    one_apart = [any(sum(x != y for x, y in zip(c, d)) == 1 for d in combos) for c in combos]
    assert sum(one_apart) >= n / 2
    assert classes[:4] == toy.toy_classes(4)  # prefix-stable: adding classes keeps the old ones
    if n >= 12:  # every attribute takes at least two values among the first 12 classes
        assert all(len({a[k] for _, a in classes[:12]}) >= 2 for k in vocab)


def test_global_colour_histograms_do_not_reveal_the_class(tmp_path):
    """Nuisance dominates: a linear model on 8-bin-per-channel colour histograms stays near
    chance (1/6). Measured test accuracy 0.12, 0.17, 0.22 for seeds 0, 1, 2."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = toy.generate_toy_cub(tmp_path / "cub", num_classes=6, train_per_class=25,
                                test_per_class=15, image_size=64, seed=0)
    images, labels = _table(root, "images.txt"), _table(root, "image_class_labels.txt")
    split = _table(root, "train_test_split.txt")
    feats, y, train = [], [], []
    for i, (rel,) in images.items():
        a = np.asarray(Image.open(root / "images" / rel).convert("RGB"))
        feats.append(np.concatenate([np.histogram(a[..., c], 8, (0, 256))[0] for c in range(3)]))
        y.append(int(labels[i][0]))
        train.append(split[i][0] == "1")
    x, y, train = np.asarray(feats, dtype=np.float64) / 64**2, np.asarray(y), np.asarray(train)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y[train])
    assert train.sum() == 150 and (~train).sum() == 90
    assert clf.score(x[~train], y[~train]) < 0.4


def test_cli_generates_reuses_and_reports_errors(tmp_path, capsys):
    args = ["--root", str(tmp_path / "cub"), "--num-classes", "3", "--train-per-class", "1",
            "--test-per-class", "1", "--image-size", "32"]
    assert toy.main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cub") in out and "generated: 3 classes, 3 train + 3 test = 6 images" in out
    assert toy.main(args) == 0 and "reused" in capsys.readouterr().out
    assert toy.main(args + ["--overwrite"]) == 0 and "generated" in capsys.readouterr().out
    assert toy.main(args + ["--seed", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: toy dataset seed must be >= 0")


def test_script_runs_as_a_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds fgclf
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_toy_dataset.py"),
                           "--image-size", "8"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "error: toy dataset image_size must be >= 32, got 8"
