"""Images decoded and resized once, kept on disk, and reused by every later run and seed.

Decoding a large JPEG and shrinking it to the training resolution costs far more than the
random crop that follows. ``--data.cache true`` stores each image resized so that its short side
is the evaluation resize size (``floor(crop / crop_pct)``, e.g. 256 for a 224 crop, 512 for 448)
as raw RGB pixels, and later epochs, runs and seeds read those pixels back instead.

- The key is the source file's absolute path, size and modification time, the bounding box and
  the target size: a changed source gets a new entry; nothing stale is ever read.
- Each entry carries its shape and a CRC32 of its pixels; a truncated or corrupted entry is
  rebuilt from the source (never used), and entries are written under a temporary name and
  renamed, so concurrent DataLoader workers and runs can share one cache.
- Evaluation sees exactly the pixels it would see without the cache (its resize becomes a
  no-op). Training crops come from the resized image instead of the full-size original (the
  usual trade of pre-resized datasets); images smaller than the target are stored as they are.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

_MAGIC = b"FGC1"
_HEADER = struct.Struct("<4sIII")  # magic, height, width, crc32 of the pixel bytes
VERSION = 1


def eval_resize_size(data_config: dict) -> int:
    """The short side that the evaluation transform resizes to: ``floor(crop / crop_pct)``.

    Only square inputs: for a non-square input size timm's eval transform keeps the aspect ratio
    differently, and a short-side copy would not give it the same pixels.
    """
    from fgclf.errors import UserError

    h, w = (int(s) for s in data_config.get("input_size", (3, 224, 224))[-2:])
    if h != w:
        raise UserError(f"--data.cache needs a square input size, this model's is {h}x{w}; set --data.image_size")
    return int(math.floor(h / float(data_config.get("crop_pct") or 0.875)))


def resize_short_side(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Shrink ``img`` so its short side is ``size``, exactly as the evaluation transform would
    (torchvision ``Resize(size)``); smaller images are returned unchanged."""
    if min(img.size) <= size:
        return img
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import functional as F

    interpolation = "bilinear" if interpolation in (None, "random") else interpolation
    return F.resize(img, size, interpolation=str_to_interp_mode(interpolation))


class ResizedImageCache:
    """A folder of resized images (see the module docstring); picklable for DataLoader workers.

    Args:
        root: Cache folder (entries go to ``root/<size>/<2 hex>/<key>.rgb``).
        size: Short side of the stored images.
        interpolation: Resize filter (the model's data-config interpolation).
    """

    def __init__(self, root: str | Path, size: int, interpolation: str = "bilinear") -> None:
        import PIL
        import torchvision

        self.root, self.size, self.interpolation = Path(root), int(size), interpolation
        self.hits = self.misses = self.rebuilt = 0  # per process (workers count their own)
        # a library upgrade may resample differently: its entries are new ones, never the old pixels
        self._versions = f"pillow {PIL.__version__}|torchvision {torchvision.__version__}"
        self.writable = _probe_writable(self.root / str(self.size))
        if not self.writable:
            import sys

            print(f"warning: image cache {self.root} is not writable; reading images without it", file=sys.stderr)

    def key(self, path: str, bbox: Optional[tuple] = None) -> str:
        st = os.stat(path)
        raw = (f"{VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{bbox}|{self.size}|"
               f"{self.interpolation}|{self._versions}")
        return hashlib.sha1(raw.encode()).hexdigest()

    def entry(self, path: str, bbox: Optional[tuple] = None) -> Path:
        key = self.key(path, bbox)
        return self.root / str(self.size) / key[:2] / f"{key}.rgb"

    def load(self, path: str, bbox: Optional[tuple] = None) -> Image.Image:
        """The resized image of ``path``: from the cache when a valid entry exists, else built and stored."""
        from fgclf.data.datasets import load_image

        if not self.writable:
            return resize_short_side(load_image(path, bbox), self.size, self.interpolation)
        entry = self.entry(path, bbox)
        if entry.is_file():
            img = _read(entry)
            if img is not None:
                self.hits += 1
                return img
            self.rebuilt += 1
        else:
            self.misses += 1
        img = resize_short_side(load_image(path, bbox), self.size, self.interpolation)
        _write(entry, img)
        return img


def _read(entry: Path) -> Optional[Image.Image]:
    """The stored image, or None when the entry is truncated or its pixels fail the checksum."""
    try:
        data = entry.read_bytes()
        magic, h, w, crc = _HEADER.unpack_from(data)
    except (OSError, struct.error):
        return None
    pixels = memoryview(data)[_HEADER.size:]
    if magic != _MAGIC or len(pixels) != h * w * 3 or zlib.crc32(pixels) != crc:
        return None
    return Image.fromarray(np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 3), "RGB")


def _write(entry: Path, img: Image.Image) -> None:
    arr = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    payload = arr.tobytes()
    import socket
    import uuid

    tmp = entry.with_name(f".{entry.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, arr.shape[0], arr.shape[1], zlib.crc32(payload)))
            f.write(payload)
        os.replace(tmp, entry)
    except OSError:  # a full or read-only cache disk slows training down, it does not stop it
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _probe_writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def default_cache_dir() -> Path:
    """``<fgclf cache>/resized`` (``$FGCLF_CACHE`` or ``~/.cache/fgclf``); not created here."""
    return Path(os.environ.get("FGCLF_CACHE", Path.home() / ".cache" / "fgclf")).expanduser() / "resized"
