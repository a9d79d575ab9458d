"""The GPU input path on the CPU: the same draws and (up to resampling) the same pixels as the PIL path,
and the files it cannot take fall back to the CPU decoder with the reason counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data import create_transform
from fgclf.data.datasets import ImageDataset, Records
from fgclf.data.device_input import (DeviceTransform, EncodedBatch, EncodedImageDataset, collate_encoded, jpeg_size,
                                     plan_for)
from fgclf.data.seeds import PerSampleSeeds
from fgclf.errors import UserError

DATA_CONFIG = {"input_size": (3, 64, 64), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.875,
               "interpolation": "bicubic"}


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth structure (gradients and blocks, so a different crop box shows) with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y0:y0 + rng.integers(10, h // 2), x0:x0 + rng.integers(10, w // 2)] = rng.integers(0, 255, 3)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def _records(tmp_path, kinds=("jpeg",) * 6, bboxes=None) -> Records:
    items = []
    for k, kind in enumerate(kinds):
        pixels = _photo(90 + 7 * k, 120 - 5 * k, k)
        path = tmp_path / f"{k}.{'png' if kind == 'png' else 'jpg'}"
        img = Image.fromarray(pixels)
        if kind == "cmyk":
            img.convert("CMYK").save(path, quality=95)
        else:
            img.save(path, **({} if kind == "png" else {"quality": 95}))
        items.append(str(path))
    return Records(items=items, labels=[k % 2 for k in range(len(items))], image_ids=[str(k) for k in range(len(items))],
                   splits=["train"] * len(items),
                   class_names=["a", "b"], bboxes=bboxes)


def _both(records: Records, is_training: bool, seed: int = 3, device_seed: int | None = None):
    """The PIL path's batch and the device path's (on the CPU), each sample seeded by (seed, epoch, index)."""
    tf = create_transform(DATA_CONFIG, is_training=is_training, aug="basic")
    pil = ImageDataset(records, tf)
    plan = plan_for(DATA_CONFIG, is_training=is_training, aug="basic")
    enc = EncodedImageDataset(ImageDataset(records), plan)
    if is_training:
        pil, enc = PerSampleSeeds(pil, seed=seed), PerSampleSeeds(enc, seed=seed if device_seed is None else device_seed)
    reference = torch.stack([pil[i][0] for i in range(len(records))])
    batch, labels = collate_encoded([enc[i] for i in range(len(records))])
    transform = DeviceTransform(plan, "cpu")
    return reference, transform(batch), transform, labels


def _pixel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in 0-1 pixel units (undoing the normalisation)."""
    std = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)
    return float(((a - b) * std).abs().mean())


def test_train_crops_follow_the_pil_path(tmp_path):
    """Same per-sample seed: the same crop box, flips and jitter, so the pixels agree up to resampling
    (under 1.5 % of the range on average); another seed gives other crops (the comparison can fail)."""
    records = _records(tmp_path)
    reference, device, _, _ = _both(records, is_training=True)
    assert device.shape == reference.shape == (6, 3, 64, 64)
    same = _pixel_error(device, reference)
    assert same < 0.015, same
    _, other, _, _ = _both(records, is_training=True, device_seed=4)
    assert _pixel_error(other, reference) > 5 * same


def test_eval_crops_follow_timms_eval_transform(tmp_path):
    records = _records(tmp_path)
    reference, device, transform, labels = _both(records, is_training=False)
    assert _pixel_error(device, reference) < 0.01
    assert transform.plan.resize == 73  # floor(64 / 0.875): the shorter side before the centre crop
    assert labels.tolist() == records.labels and transform.summary() == {"decoded": 6, "fallbacks": {}}


def test_files_nvjpeg_cannot_take_fall_back_with_their_reason(tmp_path):
    """A PNG, a CMYK JPEG and a bounding-box crop are decoded by PIL in the worker; their pixels then
    take the same device steps, and the reasons are counted."""
    records = _records(tmp_path, kinds=("jpeg", "png", "cmyk", "jpeg"))
    reference, device, transform, _ = _both(records, is_training=False)
    assert _pixel_error(device, reference) < 0.01
    assert transform.summary()["fallbacks"] == {"not a JPEG": 1, "JPEG nvJPEG does not decode like PIL": 1}
    (tmp_path / "b").mkdir()
    boxed = _records(tmp_path / "b", bboxes=[(5.0, 4.0, 50.0, 40.0)] * 6)
    reference, device, transform, _ = _both(boxed, is_training=True)
    assert _pixel_error(device, reference) < 0.015
    assert transform.summary()["fallbacks"] == {"bounding-box crop": 6}


def test_a_batch_the_device_decoder_refuses_is_decoded_image_by_image(tmp_path, monkeypatch):
    """nvJPEG refusing one file of a batch: the others are decoded on the device one by one, that one on
    the CPU, and it is counted."""
    import torchvision.io

    records = _records(tmp_path, kinds=("jpeg",) * 3)
    plan = plan_for(DATA_CONFIG, is_training=False)
    enc = EncodedImageDataset(ImageDataset(records), plan)
    batch, _ = collate_encoded([enc[i] for i in range(3)])
    real = torchvision.io.decode_jpeg
    refused = batch.samples[1].data

    def device_decode(data, *args, **kwargs):  # the device decoder: asked with device=...; the CPU one without
        if "device" in kwargs and (isinstance(data, list) or bytes(data.numpy()) == refused):
            raise RuntimeError("nvjpeg: unsupported")
        kwargs.pop("device", None)
        return real(data, *args, **kwargs)
    expected = DeviceTransform(plan, "cpu")(batch)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decode)
    transform = DeviceTransform(plan, "cpu")
    assert torch.equal(transform(batch), expected)
    assert transform.fallbacks == {"the device decoder refused it": 1}


def test_the_batch_stays_on_the_host_through_accelerates_device_placement(tmp_path):
    from accelerate.utils import send_to_device

    batch = EncodedBatch([])
    moved = send_to_device((batch, torch.zeros(2)), "cpu")
    assert moved[0] is batch


@pytest.mark.parametrize("part", [{"rotation": 10}, {"random_erasing": 0.25}, {"auto_augment": "rand-m9-mstd0.5"}])
def test_augmentation_the_device_cannot_run_is_refused(part):
    from fgclf.config import AugmentConfig

    with pytest.raises(UserError, match="needs the CPU path"):
        plan_for(DATA_CONFIG, is_training=True, aug=AugmentConfig(preset="basic", **part))


def test_jpeg_size_reads_the_frame_header(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (123, 45)).save(path, progressive=True)
    assert jpeg_size(path.read_bytes()) == (45, 123) and jpeg_size(b"\xff\xd8\xff") is None
