"""The resized-image cache: JPEG-95 copies within a bounded error, originals read when already small,
stale and corrupt entries rebuilt, a full disk refused."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data import create_transform, load_image
from fgclf.data import cache as cache_mod
from fgclf.data.cache import ResizedImageCache, eval_resize_size, resize_short_side
from fgclf.errors import UserError

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


def _photos(folder, n=4, seed=0):
    """Photo-like JPEGs (smooth colour fields plus blurred detail, as bench/input_pipeline.py makes)."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (320, 240) if i % 2 else (240, 360)
        base = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8))
        base = base.resize((w, h), Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        path = folder / f"photo {i}.jpg"
        Image.blend(base, detail, 0.25).save(path, quality=90)
        paths.append(str(path))
    return paths


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_resized_copies_are_jpeg_within_a_bounded_error_and_read_back_the_same(tmp_path, decoder):
    paths = _photos(tmp_path)
    data_config = {**DATA_CONFIG, "input_size": (3, 140, 140)}
    size = eval_resize_size(data_config)
    assert size == 160  # floor(140 / 0.875)
    cache = ResizedImageCache(tmp_path / "cache", size, "bicubic")
    tf = create_transform(data_config, is_training=False)
    for bbox in (None, (10.0, 20.0, 200.0, 190.0)):
        for path in paths:
            exact = resize_short_side(load_image(path, bbox), size, "bicubic")
            first = cache.load(path, bbox, decoder)  # built
            again = cache.load(path, bbox, decoder)  # read back
            # every epoch, the first one too, sees the stored copy: a resumed run reads the same pixels
            assert np.array_equal(np.asarray(first), np.asarray(again)), path
            assert first.size == exact.size and min(first.size) == size
            # the documented tolerance: JPEG 95 of the exact resize, measured 40-42 dB here
            assert _psnr(first, exact) > 38, path
            plain, cached = tf(load_image(path, bbox)), tf(again)  # evaluation tensors, 1 level = 1 / 127.5
            assert (plain - cached).abs().mean() < 2.5 / 127.5 and (plain - cached).abs().max() < 25 / 127.5, path
            raw = 12 + 3 * exact.size[0] * exact.size[1]  # what the raw-pixel cache stored
            assert cache.entry(path, bbox).stat().st_size < raw / 5, "the entry is compressed"
    assert cache.misses == 2 * len(paths) and cache.hits == 2 * len(paths) and cache.rebuilt == 0


def test_images_already_small_enough_are_read_from_their_originals(tmp_path, monkeypatch):
    paths = _jpegs(tmp_path)  # short sides 200 and 180
    cache = ResizedImageCache(tmp_path / "cache", 200)
    tf = create_transform(DATA_CONFIG, is_training=False)
    for bbox in (None, (10.0, 20.0, 150.0, 120.0)):
        for path in paths:
            for _ in range(2):  # built, then read back
                assert np.array_equal(np.asarray(cache.load(path, bbox)), np.asarray(load_image(path, bbox)))
                assert torch.equal(tf(cache.load(path, bbox)), tf(load_image(path, bbox)))
            assert cache.entry(path, bbox).stat().st_size == cache_mod._HEADER.size  # a marker, no pixels
    assert cache.misses == 2 * len(paths)
    # the marker is trusted: a hit decodes the source once and never resizes or writes again
    monkeypatch.setattr(cache_mod, "_write", lambda *a: pytest.fail("rewrote a marker"))
    monkeypatch.setattr(cache_mod, "resize_short_side", lambda *a: pytest.fail("resized again"))
    assert np.array_equal(np.asarray(cache.load(paths[0])), np.asarray(load_image(paths[0])))


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
    assert _psnr(after, resize_short_side(load_image(path), 73)) > 25  # JPEG 95 of noise-like detail at 73 px
    # a flipped payload byte and a truncated file both fail the check and are rebuilt from the source
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


def _usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=10 ** 13, used=10 ** 13 - free, free=free)


def test_a_disk_that_would_fill_is_refused_and_the_size_is_reported(tmp_path, monkeypatch, capsys):
    paths = _photos(tmp_path, n=4)  # 240x360 and 320x240 -> 160x240 and 213x160 at 160
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(small)
    items = paths + [str(small), 7]  # an HF row index is skipped
    cache = ResizedImageCache(tmp_path / "cache", 160)
    need = sum(cache._estimate(p, None) for p in items[:-1])
    header, jpeg = cache_mod._HEADER.size, cache_mod._HEADER.size + cache_mod.JPEG_OVERHEAD
    # from the headers alone: short side scaled to 160, 0.5 bytes a pixel, the small PNG as a marker
    assert need == 2 * (jpeg + int(160 * 240 * 0.5)) + 2 * (jpeg + int(320 * 240 * (160 / 240) ** 2 * 0.5)) + header
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda folder: _usage(cache_mod.RESERVE_BYTES + need - 1))
    with pytest.raises(UserError, match=r"needs ~.* more in .*cache.160 and only .* free .*--data.cache_dir .*"
                                        r"--data.cache false"):
        cache.check_space(items)
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda folder: _usage(10 ** 12))
    line = cache.check_space(items, verbose=True)
    assert capsys.readouterr().out.strip() == line
    assert "0 images stored" in line and "5 to build" in line
    for p in items[:-1]:
        cache.load(p)
    built = sum(cache.entry(p).stat().st_size for p in items[:-1])
    assert need / 2 < built <= need  # the estimate does not undercount (and is not wildly off)
    line = cache.check_space(items, verbose=False)
    assert capsys.readouterr().out == ""
    assert f"5 images stored ({cache_mod._human(built)}, 1 of them read from their originals" in line
    assert "0 to build" in line
    monkeypatch.setenv("RANK", "1")  # other processes print nothing by default
    cache.check_space(items)
    assert capsys.readouterr().out == ""


def test_non_square_inputs_are_refused():
    with pytest.raises(UserError, match="square input size"):
        eval_resize_size({**DATA_CONFIG, "input_size": (3, 64, 96)})
