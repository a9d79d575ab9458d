"""Images decoded and resized once, kept on disk, and reused by every later run and seed.

Decoding a large JPEG and shrinking it to the training resolution costs far more than the
random crop that follows. ``--data.cache true`` stores each image resized so that its short side
is the evaluation resize size (``floor(crop / crop_pct)``, e.g. 256 for a 224 crop, 512 for 448)
as a JPEG of quality 95 (4:2:0), and later epochs, runs and seeds read that copy instead.

- Why JPEG 95 and not raw pixels or a lossless format: ``bench/input_pipeline.py`` measures, at
  512 px, raw RGB ~1 MB an image (0.5 ms to read), WebP lossless ~0.55 MB (10 ms: slower than
  decoding the 800x600 original), PNG ~0.55 MB (16 ms), JPEG 95 ~0.1 MB (3 ms) at 42 dB PSNR.
- An image whose short side (after the bounding-box crop) is already at or below the target
  gains nothing from a copy: its entry is a marker that says "read the original" (a few bytes,
  so the size is checked once, not every epoch), and it gives exactly the uncached pixels.
- The key is the source file's absolute path, size and modification time, the bounding box, the
  target size, the format and the Pillow/torchvision versions: a changed source gets a new
  entry; nothing stale is ever read.
- Each entry carries a CRC32 of its payload; a truncated or corrupted entry is rebuilt from the
  source (never used), and entries are written under a temporary name and renamed, so
  concurrent DataLoader workers and runs can share one cache.
- Evaluation of a resized image sees the JPEG-95 copy of the pixels it would see without the
  cache (its resize becomes a no-op): a tolerance, not identity (tests/data/test_cache.py
  bounds it; bench/input_pipeline.py measures it). Every epoch, the first included, reads the
  stored copy, so a resumed run sees the pixels an uninterrupted one does. Training crops come
  from the resized image instead of the full-size original (the usual trade of pre-resized
  datasets).
- :meth:`ResizedImageCache.check_space` refuses a run whose missing entries would fill the disk
  and prints the cache's size once (main process).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

_MAGIC = b"FGC2"
_HEADER = struct.Struct("<4sBII")  # magic, kind, payload length, crc32 of the payload
_JPEG, _ORIGINAL = 1, 2  # kinds: a resized JPEG copy; "read the original" (already small enough)
VERSION = 2
JPEG_QUALITY = 95
# disk-check estimate of a stored copy: the bench's detailed synthetic photos take 0.31 bytes a
# pixel at quality 95, camera photos less; the margin keeps the estimate on the safe side
BYTES_PER_PIXEL = 0.5
JPEG_OVERHEAD = 1024  # headers and tables of one stored JPEG (~600 bytes from Pillow)
RESERVE_BYTES = 1 << 30  # left free for everything else on that disk


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
        root: Cache folder (entries go to ``root/<size>/<2 hex>/<key>.img``).
        size: Short side of the stored images.
        interpolation: Resize filter (the model's data-config interpolation).
    """

    def __init__(self, root: str | Path, size: int, interpolation: str = "bilinear") -> None:
        import PIL
        import torchvision

        self.root, self.size, self.interpolation = Path(root), int(size), interpolation
        self.hits = self.misses = self.rebuilt = 0  # per process (workers count their own)
        # a library upgrade may resample or encode differently: its entries are new ones, never the old pixels
        self._versions = f"pillow {PIL.__version__}|torchvision {torchvision.__version__}|jpeg {JPEG_QUALITY} 420"
        self.folder = self.root / str(self.size)
        self.writable = _probe_writable(self.folder)
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
        return self.folder / key[:2] / f"{key}.img"

    def load(self, path: str, bbox: Optional[tuple] = None, decoder: str = "pil") -> Image.Image:
        """The resized image of ``path``: from the cache when a valid entry exists, else built and
        stored; ``decoder`` decodes the source file and the stored JPEG (:mod:`fgclf.data.decode`)."""
        from fgclf.data.datasets import load_image
        from fgclf.data.decode import decode_bytes

        if not self.writable:
            return resize_short_side(load_image(path, bbox, decoder), self.size, self.interpolation)
        entry = self.entry(path, bbox)
        stored = _read(entry)
        if stored is not None:
            self.hits += 1
            kind, payload = stored
            if kind == _ORIGINAL:
                return load_image(path, bbox, decoder)
            return decode_bytes(payload, decoder)
        if entry.exists():  # there, but truncated or corrupted
            self.rebuilt += 1
        else:
            self.misses += 1
        img = load_image(path, bbox, decoder)
        if min(img.size) <= self.size:  # nothing to gain from a copy: remember to read the original
            _write(entry, _ORIGINAL, b"")
            return img
        payload = encode_jpeg(resize_short_side(img, self.size, self.interpolation))
        _write(entry, _JPEG, payload)
        return decode_bytes(payload, decoder)  # the stored pixels, so the first epoch sees what later ones do

    def check_space(self, items: Sequence, bboxes: Optional[Sequence] = None, *, verbose: Optional[bool] = None) -> str:
        """Refuse when building the missing entries of ``items`` would fill the disk; report the size.

        Stats every entry (and reads the header of each source without one), so it costs
        about a second for ten thousand new images and much less once they are stored.

        Args:
            items: Image paths (other items, e.g. HF row indices, are skipped).
            bboxes: Their bounding boxes (or None).
            verbose: Print the summary (default: on the main process only, ``RANK`` 0).

        Returns:
            A one-line summary: entries stored and their size, originals read, entries to build.

        Raises:
            UserError: When the estimate of the missing entries plus 1 GiB exceeds the free space.
        """
        from fgclf.errors import UserError

        if verbose is None:
            verbose = os.environ.get("RANK", "0") == "0"
        if not self.writable:
            return f"image cache {self.folder}: not writable, not used"
        stored = originals = stored_bytes = 0
        missing: list[tuple[str, Optional[tuple]]] = []
        for i, path in enumerate(items):
            if not isinstance(path, str):
                continue
            bbox = bboxes[i] if bboxes is not None else None
            try:
                st = os.stat(self.entry(path, bbox))
            except FileNotFoundError:
                missing.append((path, bbox))
                continue
            stored, stored_bytes = stored + 1, stored_bytes + st.st_size
            originals += st.st_size == _HEADER.size
        need = sum(self._estimate(path, bbox) for path, bbox in missing)
        free = shutil.disk_usage(self.folder).free
        if need + RESERVE_BYTES > free:
            raise UserError(f"the image cache needs ~{_human(need)} more in {self.folder} and only {_human(free)} "
                            f"are free (1 GiB kept); set --data.cache_dir to a folder on a larger disk or "
                            f"--data.cache false")
        line = (f"image cache {self.folder}: {stored} images stored ({_human(stored_bytes)}, {originals} of them "
                f"read from their originals: short side <= {self.size}), {len(missing)} to build "
                f"(~{_human(need)}; {_human(free)} free)")
        if verbose:
            print(line, flush=True)
        return line

    def _estimate(self, path: str, bbox: Optional[tuple]) -> int:
        """Bytes the entry of ``path`` will take, from the image header alone."""
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # an unreadable file never gets an entry (verify_images reports it)
            return 0
        if bbox is not None:
            w, h = max(1, int(round(bbox[2]))), max(1, int(round(bbox[3])))
        short = min(w, h)
        if short <= self.size:
            return _HEADER.size
        scale = self.size / short
        return _HEADER.size + JPEG_OVERHEAD + int(w * scale * h * scale * BYTES_PER_PIXEL)


def encode_jpeg(img: Image.Image) -> bytes:
    """The cache's stored form of ``img``: JPEG quality 95, 4:2:0 (see the module docstring)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=2)
    return buf.getvalue()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _read(entry: Path) -> Optional[tuple[int, bytes]]:
    """``(kind, payload)`` of the entry, or None when it is missing, truncated or fails the checksum."""
    try:
        data = entry.read_bytes()
        magic, kind, length, crc = _HEADER.unpack_from(data)
    except (OSError, struct.error):
        return None
    payload = data[_HEADER.size:]
    if magic != _MAGIC or kind not in (_JPEG, _ORIGINAL) or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return kind, payload


def _write(entry: Path, kind: int, payload: bytes) -> None:
    import socket
    import uuid

    tmp = entry.with_name(f".{entry.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, kind, len(payload), zlib.crc32(payload)))
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
