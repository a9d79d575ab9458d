"""``--data.decoder torchvision``: the same RGB pixels as PIL on every kind of file, or PIL itself."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data import ImageDataset, Records, create_transform, load_image
from fgclf.data import decode as dec
from fgclf.errors import UserError


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus fine detail (photo-like, so chroma upsampling matters)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8))
    detail = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.blend(base.resize((w, h), Image.BICUBIC), Image.fromarray(detail), 0.2)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


PLAIN = {  # name -> (image, save options): all go through decode_jpeg
    "420 q90": (_photo(160, 120), dict(quality=90)),
    "422 odd size": (_photo(101, 77, 1), dict(quality=85, subsampling=1)),
    "444 q95": (_photo(96, 130, 2), dict(quality=95, subsampling=0)),
    "progressive": (_photo(120, 90, 3), dict(quality=80, progressive=True)),
    "restart markers": (_photo(128, 64, 4), dict(quality=75, restart_marker_blocks=3)),
    "grayscale": (_photo(90, 70, 5).convert("L"), dict(quality=90)),
    "optimized q50": (_photo(70, 50, 6), dict(quality=50, optimize=True)),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_torchvision_gives_the_pil_pixels_on_plain_jpegs(name, tmp_path, monkeypatch):
    img, options = PLAIN[name]
    path = tmp_path / "x.jpg"
    path.write_bytes(_jpeg(img, **options))
    assert dec.plain_jpeg(path.read_bytes()), name
    calls = []
    real = dec._decode_torchvision
    monkeypatch.setattr(dec, "_decode_torchvision", lambda data: calls.append(1) or real(data))
    ours, pil = load_image(str(path), decoder="torchvision"), load_image(str(path))
    assert calls == [1]  # it was decode_jpeg, not the PIL fallback
    assert ours.mode == pil.mode == "RGB" and ours.size == pil.size
    assert np.array_equal(np.asarray(ours), np.asarray(pil)), name
    box = (3.0, 5.0, 40.0, 30.0)  # the bounding-box crop follows either decoder alike
    assert np.array_equal(np.asarray(load_image(str(path), box, "torchvision")), np.asarray(load_image(str(path), box)))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    return _jpeg(_photo(80, 40, 7), quality=90, exif=exif.tobytes())


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40)).save(buf, "PNG")
    return buf.getvalue()


def _rgba_png() -> bytes:
    arr = np.asarray(_photo(40, 30, 8).convert("RGBA")).copy()
    arr[..., 3] = np.linspace(0, 255, 40, dtype=np.uint8)[None, :]
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    return buf.getvalue()


OTHER = {  # name -> (bytes, does torchvision decode it?)
    "exif orientation": (_exif_rotated, True),  # neither path rotates: load_image never applied EXIF
    "cmyk (adobe marker)": (lambda: _jpeg(_photo(60, 40, 9).convert("CMYK"), quality=90), False),
    "png": (lambda: (lambda b: (_photo(50, 40, 10).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()), False),
    "16-bit png": (_png16, False),
    "rgba png": (_rgba_png, False),
    "trailing bytes after EOI": (lambda: _jpeg(_photo(40, 30, 11), quality=90) + b"junk", False),
}


@pytest.mark.parametrize("name", list(OTHER))
def test_other_files_give_the_pil_image(name, tmp_path):
    make, via_torchvision = OTHER[name]
    data = make()
    assert dec.plain_jpeg(data) is via_torchvision, name
    path = tmp_path / "x.img"
    path.write_bytes(data)
    ours, pil = load_image(str(path), decoder="torchvision"), load_image(str(path))
    assert ours.mode == "RGB" and ours.size == pil.size and np.array_equal(np.asarray(ours), np.asarray(pil)), name


def test_a_truncated_jpeg_fails_as_with_pil(tmp_path):
    data = _jpeg(_photo(120, 90), quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])  # libjpeg alone would only warn and fill the rest grey
    assert not dec.plain_jpeg(path.read_bytes())
    with pytest.raises(OSError):
        load_image(str(path))
    with pytest.raises(OSError):
        load_image(str(path), decoder="torchvision")


def test_dataset_tensors_match_and_unknown_decoders_are_refused(tmp_path):
    paths = []
    for i, (img, options) in enumerate(PLAIN.values()):
        paths.append(str(tmp_path / f"{i}.jpg"))
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(img, **options))
    rec = Records(paths, [0] * len(paths), [str(i) for i in range(len(paths))], ["test"] * len(paths), ["a"])
    tf = create_transform({"input_size": (3, 48, 48), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
                           "interpolation": "bicubic"}, is_training=False)
    for i in range(len(paths)):
        assert torch.equal(ImageDataset(rec, tf, decoder="torchvision")[i][0], ImageDataset(rec, tf)[i][0])
    with pytest.raises(UserError, match="unknown --data.decoder 'turbo'; use one of pil, torchvision"):
        ImageDataset(rec, tf, decoder="turbo")
