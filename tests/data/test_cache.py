"""The resized-image cache: same evaluation pixels as no cache, stale and corrupt entries rebuilt."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data import create_transform, load_image
from fgclf.data.cache import ResizedImageCache, eval_resize_size, resize_short_side

DATA_CONFIG = {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875,
               "interpolation": "bicubic"}


def _jpegs(folder, n=4, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (320, 200) if i % 2 else (180, 300)
        base = rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8)  # smooth-ish content, like photos
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        path = folder / f"img {i}.jpg"  # a space in the name on purpose
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def test_evaluation_pixels_are_identical_with_and_without_the_cache(tmp_path):
    paths = _jpegs(tmp_path)
    size = eval_resize_size(DATA_CONFIG)
    assert size == 73  # floor(64 / 0.875)
    cache = ResizedImageCache(tmp_path / "cache", size, DATA_CONFIG["interpolation"])
    tf = create_transform(DATA_CONFIG, is_training=False)
    for bbox in (None, (10.0, 20.0, 150.0, 120.0)):
        for path in paths:
            plain = tf(load_image(path, bbox))
            first = tf(cache.load(path, bbox))  # built
            again = tf(cache.load(path, bbox))  # read back
            assert torch.equal(plain, first) and torch.equal(plain, again), path
            stored = cache.load(path, bbox)
            assert min(stored.size) == size
            assert np.array_equal(np.asarray(stored), np.asarray(resize_short_side(load_image(path, bbox), size,
                                                                                   "bicubic")))
    assert cache.misses == 2 * len(paths) and cache.hits == 4 * len(paths) and cache.rebuilt == 0


def test_changed_source_gets_a_new_entry_and_corrupt_entries_are_rebuilt(tmp_path):
    path = _jpegs(tmp_path, n=1)[0]
    cache = ResizedImageCache(tmp_path / "cache", 73)
    before = np.asarray(cache.load(path)).copy()
    old_entry = cache.entry(path)
    # the source changes (new pixels, new mtime): the old entry is never read for it again
    Image.fromarray(255 - np.asarray(load_image(path))).save(path, quality=90)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert cache.entry(path) != old_entry
    after = np.asarray(cache.load(path))
    assert not np.array_equal(before, after)
    assert np.array_equal(after, np.asarray(resize_short_side(load_image(path), 73)))
    # a flipped pixel byte and a truncated file both fail the check and are rebuilt from the source
    entry = cache.entry(path)
    for damage in ("flip", "truncate"):
        data = bytearray(entry.read_bytes())
        if damage == "flip":
            data[-5] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        entry.write_bytes(bytes(data))
        rebuilt = cache.rebuilt
        assert np.array_equal(np.asarray(cache.load(path)), after), damage
        assert cache.rebuilt == rebuilt + 1
        assert np.array_equal(np.asarray(cache.load(path)), after) and cache.rebuilt == rebuilt + 1  # fixed on disk


def test_small_images_are_kept_and_an_unwritable_cache_still_serves_images(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)).save(small)
    cache = ResizedImageCache(tmp_path / "cache", 73)
    assert np.array_equal(np.asarray(cache.load(str(small))), np.asarray(load_image(str(small))))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    stuck = ResizedImageCache(blocked, 73)
    assert not stuck.writable and "not writable" in capsys.readouterr().err
    assert np.array_equal(np.asarray(stuck.load(str(small))), np.asarray(load_image(str(small))))
    # entries written before are never read by a cache of another Pillow/torchvision version
    other = ResizedImageCache(tmp_path / "cache", 73)
    other._versions = "pillow 0.0|torchvision 0.0"
    assert other.entry(str(small)) != cache.entry(str(small))


def test_non_square_inputs_are_refused():
    from fgclf.errors import UserError

    with pytest.raises(UserError, match="square input size"):
        eval_resize_size({**DATA_CONFIG, "input_size": (3, 64, 96)})
