"""Image file decoders: PIL (default) or ``torchvision.io.decode_jpeg`` for plain JPEGs.

``--data.decoder torchvision`` decodes 8-bit baseline/progressive JPEGs with one or three
components (YCbCr or grayscale) with libjpeg-turbo through torchvision, and every other file
with PIL, so the result is always the RGB image that :func:`fgclf.data.datasets.to_rgb` gives:

- no EXIF rotation on either path (``load_image`` does not apply it; ``decode_jpeg`` is called
  with ``apply_exif_orientation=False``);
- CMYK/YCCK (4 components), Adobe-marked (APP14) colour transforms, 12/16-bit and lossless or
  arithmetic-coded JPEGs, a file without its end marker (truncated: PIL raises where libjpeg
  only warns) and non-JPEG files go to PIL.

Both wheels bundle libjpeg-turbo with the default integer IDCT and fancy upsampling: on the
JPEGs the tests generate (4:2:0, 4:2:2, 4:4:4, progressive, restart markers, grayscale, odd
sizes) the pixels are identical (max difference 0), which tests/data/test_decode.py checks.
"""
from __future__ import annotations

import io
from typing import Optional

from PIL import Image

from fgclf.errors import UserError

DECODERS = ("pil", "torchvision", "nvjpeg")  # nvjpeg: fgclf/data/device_input.py
# SOF0 baseline, SOF1 extended, SOF2 progressive (Huffman); the others (lossless, arithmetic) go to PIL
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 reserved, CC DAC are not SOFs


def check_decoder(name: str) -> str:
    """``name`` when it is a known decoder, else a UserError listing them."""
    if name not in DECODERS:
        raise UserError(f"unknown --data.decoder {name!r}; use one of {', '.join(DECODERS)}")
    return name


def plain_jpeg(data: bytes) -> bool:
    """True when ``data`` is an 8-bit Huffman JPEG with 1 or 3 components, no Adobe colour
    marker and an end marker: the files torchvision decodes to the same pixels as PIL."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe":  # APP14: RGB/CMYK/YCCK transform flags
            return False
        if marker in _SOF_ALL:
            if marker not in _SOF_OK or i + 10 > len(data):
                return False
            precision, components = data[i + 4], data[i + 9]
            return precision == 8 and components in (1, 3)
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return False
        i += 2 + length
    return False


def _decode_torchvision(data: bytes) -> Optional[Image.Image]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        tensor = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=False)
    except RuntimeError:  # anything libjpeg refuses: PIL decides (and names the problem)
        return None
    # HWC uint8 -> PIL without a float round trip (the transforms take PIL images)
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy(), "RGB")


def decode_bytes(data: bytes, decoder: str = "pil") -> Image.Image:
    """The RGB image in the file bytes ``data``, decoded by ``decoder`` (see the module docstring)."""
    from fgclf.data.datasets import to_rgb

    if decoder == "torchvision" and plain_jpeg(data):
        img = _decode_torchvision(data)
        if img is not None:
            return img
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


def decode_file(path: str, decoder: str = "pil") -> Image.Image:
    """The RGB image of the file ``path``; ``pil`` opens the file directly (as always)."""
    from fgclf.data.datasets import to_rgb

    if decoder == "pil":
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    with open(path, "rb") as f:
        return decode_bytes(f.read(), decoder)
