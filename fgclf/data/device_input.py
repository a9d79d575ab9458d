"""The GPU input path (``--data.decoder nvjpeg``): workers read file bytes, the device decodes and augments.

A CPU pipeline decodes a ~500x375 JPEG and crops it at 448 px at about 90 images/s per core
(``bench/input_pipeline.py``), far below what one GPU trains at. With ``--data.decoder nvjpeg`` the
loader workers only read each file and draw its augmentation; the batch is decoded on the GPU
(``torchvision.io.decode_jpeg`` with ``device="cuda"``: nvJPEG, batched) and cropped, resized,
flipped, colour-jittered and normalised there.

What each worker does per sample (:class:`EncodedImageDataset`):

- a plain JPEG (:func:`fgclf.data.decode.plain_jpeg`: 8-bit, 1 or 3 components, no Adobe colour
  marker, complete) is passed on as its bytes, with its size read from the frame header;
- anything else goes through the CPU decoder (PIL), and the decoded pixels are passed on: a PNG
  or another format, a JPEG nvJPEG would decode differently (CMYK, Adobe-marked, 12-bit,
  lossless), a bounding-box crop (``--data.bbox_crop``), the resized cache (``--data.cache``) or a
  row of an HF dataset. The reason is counted and reported at the end of the run;
- the training augmentation's random draws are made here, in the same order and from the same
  per-sample seed as the PIL path (torchvision's ``RandomResizedCrop.get_params``, the flips'
  ``torch.rand(1)``, ``ColorJitter.get_params``), so a sample gets the same crop box, flips and
  jitter factors on either path.

On the device (:class:`DeviceTransform`): decode, then per image ``resized_crop`` (the drawn box,
antialiased, the model's interpolation), flips, colour jitter in the drawn order on float pixels,
and for evaluation the timm eval transform's resize of the shorter side and centre crop; then the
batch is normalised. The result matches the PIL path up to resampling and rounding: PIL resamples
and jitters 8-bit images, torch resamples with its own antialiasing kernel and jitters in float
(tests/data/test_device_input.py measures the difference on both train and eval crops).

The train augmentations that run on tensors are supported: random resized crop, horizontal and
vertical flips, colour jitter (the ``basic`` preset and its parts). Rotation, auto-augment
policies, blur, noise and random erasing, and progressive resizing are refused with one line
before anything starts: use the default decoder for them. Test-time augmentation works (its
views are taken from the evaluated batch).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fgclf.errors import UserError

SUPPORTED_PARTS = ("scale", "ratio", "hflip", "vflip", "color_jitter")


@dataclass
class InputPlan:
    """What the device does to each image: ``train`` (random resized crop + flips + jitter) or eval
    (resize the shorter side to ``resize``, centre crop); then normalise."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    vflip: float = 0.0
    color_jitter: float = 0.0
    resize: Optional[int] = None  # eval: the shorter side before the centre crop


def plan_for(data_config: dict, *, is_training: bool, aug="basic") -> InputPlan:
    """The :class:`InputPlan` that reproduces ``create_transform(data_config, is_training, aug)``
    on tensors; a UserError for a part that does not run on the device."""
    from torchvision import transforms as T

    from fgclf.data.transforms import _IMAGENET_MEAN, _IMAGENET_STD, _eval_transform, _train_transform, resolve_augment

    size = tuple(int(s) for s in data_config.get("input_size", (3, 224, 224))[-2:])
    mean = tuple(float(m) for m in data_config.get("mean", _IMAGENET_MEAN))  # the PIL path's defaults
    std = tuple(float(s) for s in data_config.get("std", _IMAGENET_STD))
    interpolation = data_config.get("interpolation") or "bilinear"
    interpolation = "bilinear" if interpolation == "random" else interpolation
    cfg = resolve_augment(aug) if is_training else None
    if cfg is None or cfg.scale is None:  # evaluation, or the `none` preset (the eval transform)
        steps = _eval_transform(data_config).transforms
        resize = next((t for t in steps if isinstance(t, T.Resize)), None)
        crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
        other = [t for t in steps if not isinstance(t, (T.Resize, T.CenterCrop, T.Normalize))
                 and type(t).__name__ not in ("ToTensor", "MaybeToTensor")]
        if resize is None or crop is None or other or not isinstance(resize.size, int) and len(resize.size) != 1:
            raise UserError(f"--data.decoder nvjpeg: the eval transform {steps} is not a resize of the shorter "
                            "side and a centre crop; use the default decoder")
        return InputPlan(size=size, mean=mean, std=std, interpolation=resize.interpolation.value, train=False,
                         resize=int(resize.size if isinstance(resize.size, int) else resize.size[0]))
    check_augment(cfg)
    _train_transform(cfg, data_config)  # the same checks as the PIL path
    return InputPlan(size=size, mean=mean, std=std, interpolation=interpolation, train=True,
                     scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=float(cfg.hflip), vflip=float(cfg.vflip),
                     color_jitter=float(cfg.color_jitter))


def check_augment(aug) -> None:
    """A UserError when the train augmentation ``aug`` (a preset or an AugmentConfig) has parts that do not
    run on the device (checked before any work starts)."""
    from fgclf.data.transforms import resolve_augment

    cfg = resolve_augment(aug)
    if cfg.scale is None:  # the `none` preset: the eval transform
        return
    unsupported = {"rotation": cfg.rotation, "auto_augment": cfg.auto_augment != "none",
                   "gaussian_blur": cfg.gaussian_blur, "gaussian_noise": cfg.gaussian_noise,
                   "random_erasing": cfg.random_erasing}
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise UserError(f"--data.decoder nvjpeg runs {', '.join(SUPPORTED_PARTS)} on the GPU; augmentation "
                        f"{', '.join(used)} needs the CPU path: use --data.decoder pil or drop them")


def draw_params(plan: InputPlan, height: int, width: int) -> np.ndarray:
    """The random choices for one training image of ``height`` x ``width``, drawn from torch's RNG in
    the PIL pipeline's order: ``[top, left, h, w, hflip, vflip, brightness, contrast, saturation,
    order0..3]`` (order: the jitter operations' permutation)."""
    from torchvision import transforms as T

    shape_only = torch.zeros(1, 1, 1).expand(1, height, width)  # get_params reads the size only
    top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(plan.scale), list(plan.ratio))
    hflip = float(torch.rand(1) < plan.hflip) if plan.hflip > 0 else 0.0
    vflip = float(torch.rand(1) < plan.vflip) if plan.vflip > 0 else 0.0
    factors, order = [1.0, 1.0, 1.0], [0, 1, 2, 3]
    if plan.color_jitter > 0:
        jitter = T.ColorJitter(plan.color_jitter, plan.color_jitter, plan.color_jitter)
        fn_idx, b, c, s, _ = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        factors, order = [float(b), float(c), float(s)], [int(i) for i in fn_idx]
    return np.array([top, left, h, w, hflip, vflip, *factors, *order], dtype=np.float64)


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) from a JPEG's frame header, or None."""
    from fgclf.data.decode import _SOF_ALL

    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _SOF_ALL:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class Encoded:
    """One sample as a worker hands it on: JPEG ``data`` (bytes) or decoded ``pixels`` (HWC uint8),
    why it was decoded on the CPU (``reason``, None for bytes), and its random ``params``."""

    __slots__ = ("data", "pixels", "reason", "params")

    def __init__(self, data: Optional[bytes], pixels: Optional[np.ndarray], reason: Optional[str],
                 params: Optional[np.ndarray]) -> None:
        self.data, self.pixels, self.reason, self.params = data, pixels, reason, params


class EncodedBatch:
    """A batch of :class:`Encoded` samples. Not a tensor, list or mapping: accelerate's device
    placement leaves it on the host, where nvJPEG wants its input."""

    def __init__(self, samples: list[Encoded]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)


def collate_encoded(batch: list) -> tuple[EncodedBatch, torch.Tensor]:
    """DataLoader ``collate_fn`` of an :class:`EncodedImageDataset`."""
    return EncodedBatch([s for s, _ in batch]), torch.tensor([int(y) for _, y in batch], dtype=torch.long)


class EncodedImageDataset(torch.utils.data.Dataset):
    """``(Encoded, label)`` per image of an :class:`fgclf.data.datasets.ImageDataset` (see the module
    docstring); wrap it in :class:`fgclf.data.PerSampleSeeds` for training, like the PIL datasets."""

    def __init__(self, images, plan: InputPlan) -> None:
        self.images, self.plan = images, plan
        self.records, self.class_names, self.targets = images.records, images.class_names, images.targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from fgclf.data.decode import plain_jpeg

        rec = self.records
        item = rec.items[index]
        bbox = rec.bboxes[index] if rec.bboxes is not None else None
        data = reason = pixels = None
        if not isinstance(item, str):
            reason = "HF dataset row"
        elif bbox is not None:
            reason = "bounding-box crop"
        elif self.images.cache is not None:
            reason = "resized cache"
        else:
            with open(item, "rb") as f:
                data = f.read()
            if not plain_jpeg(data):
                reason = "JPEG nvJPEG does not decode like PIL" if data[:2] == b"\xff\xd8" else "not a JPEG"
        size = jpeg_size(data) if reason is None else None
        if reason is None and size is None:
            reason = "JPEG without a readable size"
        if reason is not None:
            data, pixels = None, np.array(self.images.load(index), dtype=np.uint8)  # a writable copy
            size = pixels.shape[:2]
        params = draw_params(self.plan, *size) if self.plan.train else None
        return Encoded(data, pixels, reason, params), rec.labels[index]


class DeviceTransform:
    """Decode an :class:`EncodedBatch` on ``device`` and apply the plan: a ``(N, 3, H, W)`` float batch.

    ``fallbacks`` counts, by reason, the samples that came decoded from the workers and the JPEGs the
    device decoder refused (decoded on the CPU here instead); ``decoded`` counts every image.
    """

    def __init__(self, plan: InputPlan, device) -> None:
        self.plan, self.device = plan, torch.device(device)
        self.fallbacks: collections.Counter = collections.Counter()
        self.decoded = 0
        self._mean = torch.tensor(plan.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(plan.std, device=self.device).view(1, 3, 1, 1)

    def _decode(self, batch: EncodedBatch) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[Optional[torch.Tensor]] = [None] * len(batch)
        jpegs = [k for k, s in enumerate(batch.samples) if s.data is not None]
        for k, s in enumerate(batch.samples):
            if s.data is None:
                self.fallbacks[s.reason] += 1
                images[k] = torch.from_numpy(s.pixels).permute(2, 0, 1).to(self.device, non_blocking=True)
        if jpegs:
            raw = [torch.frombuffer(bytearray(batch.samples[k].data), dtype=torch.uint8) for k in jpegs]
            try:
                decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=False)
            except RuntimeError:  # one file the device decoder refuses: each on its own, the CPU for those
                decoded = []
                for r in raw:
                    try:
                        decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device,
                                                   apply_exif_orientation=False))
                    except RuntimeError:
                        self.fallbacks["the device decoder refused it"] += 1
                        decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, apply_exif_orientation=False)
                                       .to(self.device))
            for k, img in zip(jpegs, decoded):
                images[k] = img
        self.decoded += len(batch)
        return images

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        p = self.plan
        mode = InterpolationMode(p.interpolation)
        out = torch.empty((len(batch), 3, *p.size), device=self.device)
        for k, img in enumerate(self._decode(batch)):
            if p.train:
                top, left, h, w, hflip, vflip, b, c, s, *order = batch.samples[k].params
                img = F.resized_crop(img, int(top), int(left), int(h), int(w), list(p.size), mode, antialias=True)
                if hflip:
                    img = img.flip(-1)
                if vflip:
                    img = img.flip(-2)
                img = img.float().div_(255)
                if p.color_jitter > 0:
                    for op in order:
                        if op == 0:
                            img = F.adjust_brightness(img, b)
                        elif op == 1:
                            img = F.adjust_contrast(img, c)
                        elif op == 2:
                            img = F.adjust_saturation(img, s)
                out[k] = img
            else:
                img = F.center_crop(F.resize(img, [p.resize], mode, antialias=True), list(p.size))
                out[k] = img.float().div_(255)
        return out.sub_(self._mean).div_(self._std)

    def summary(self) -> dict:
        """What was decoded where: ``{"decoded", "fallbacks": {reason: count}}``."""
        return {"decoded": self.decoded, "fallbacks": dict(self.fallbacks)}


def summarize(accelerator, transforms: dict) -> dict:
    """``{name: DeviceTransform.summary()}`` added up over every process (collective: call on all)."""
    from accelerate.utils import gather_object

    mine = {name: t.summary() for name, t in transforms.items()}
    everyone = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    out = {}
    for name in mine:
        fallbacks: collections.Counter = collections.Counter()
        for part in everyone:
            fallbacks.update(part[name]["fallbacks"])
        out[name] = {"decoded": sum(part[name]["decoded"] for part in everyone), "fallbacks": dict(fallbacks)}
    return out


def check_device(device) -> None:
    """One line when the GPU path cannot run here."""
    if torch.device(device).type != "cuda":
        raise UserError("--data.decoder nvjpeg decodes on the GPU (torchvision.io.decode_jpeg on CUDA); this run's "
                        f"device is {device}: use --data.decoder pil or torchvision")


__all__ = ["DeviceTransform", "Encoded", "EncodedBatch", "EncodedImageDataset", "InputPlan", "check_augment",
           "check_device", "collate_encoded", "draw_params", "jpeg_size", "plan_for", "summarize"]
