"""Train/eval transforms resolved from the model's pretrained data config (timm's).

The eval transform is timm's (resize by ``crop_pct`` + centre crop + normalise). A train transform
is a preset (a named set of part values, :func:`list_augmentations`) with optional per-part
overrides (:class:`AugmentConfig`), composed in this order::

    RandomResizedCrop(scale, ratio) -> hflip -> vflip -> rotation -> auto_augment policy
    -> colour jitter -> gaussian blur -> ToTensor -> gaussian noise -> Normalize(mean, std)
    -> random erasing

Every random draw follows torch's RNG (timm's policies, which use ``random``/``numpy``, are run
under :func:`torch_seeded_rng`), so ``torch.manual_seed`` -- and a DataLoader's per-worker seed --
reproduces an augmented sample.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from fgclf.config import AugmentConfig  # defined with the other config dataclasses (no torch import)
from fgclf.errors import UserError
from fgclf.registry import Registry, unknown_name_message

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


_PARTS = tuple(f.name for f in dataclasses.fields(AugmentConfig) if f.name != "preset")
_BASIC = dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, rotation=0.0,
              auto_augment="none", color_jitter=0.2, gaussian_blur=0.0, gaussian_noise=0.0,
              random_erasing=0.0)
_PRESETS: Registry[Optional[dict]] = Registry("augmentation preset")
_POLICIES: Registry[Callable] = Registry("auto_augment policy")


def register_augmentation(name: str, **parts: Any) -> None:
    """Add a preset: ``parts`` (fields of :class:`AugmentConfig`) override the ``basic`` values."""
    unknown = set(parts) - set(_PARTS)
    if unknown:
        raise ValueError(f"unknown augmentation parts {sorted(unknown)}; known: {list(_PARTS)}")
    _PRESETS.register(name)(lambda: {**_BASIC, **parts})


_PRESETS.register("none")(lambda: None)  # None = the eval transform
register_augmentation("basic")
register_augmentation("strong", auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
# a policy has its own colour ops, so (as timm does) these presets drop the colour jitter
register_augmentation("randaugment", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.0)
register_augmentation("trivialaugment", auto_augment="trivialaugment", color_jitter=0.0)
register_augmentation("autoaugment", auto_augment="autoaugment", color_jitter=0.0)
register_augmentation("augmix", auto_augment="augmix-m5-w4-d2", color_jitter=0.0)


def list_augmentations() -> list[str]:
    """Preset names accepted by ``create_transform(aug=...)`` (``none`` = eval transform)."""
    return _PRESETS.names()


def list_auto_augment_policies() -> list[str]:
    """First dash-separated word of the ``auto_augment`` strings that are understood."""
    return _POLICIES.names()


def resolve_input_config(data_config: dict, image_size: Optional[int] = None) -> dict:
    """Copy of a timm data config with ``input_size`` set to ``image_size`` when given."""
    cfg = dict(data_config)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    return cfg


def resolve_augment(aug: Union[str, AugmentConfig] = "basic", **overrides: Any) -> AugmentConfig:
    """The :class:`AugmentConfig` with every part filled from its preset, then ``overrides``.

    The ``none`` preset stays with all parts ``None`` (it is the eval transform). Raises
    :class:`UserError` for an unknown preset, part or policy, or an out-of-range value.
    """
    cfg = aug if isinstance(aug, AugmentConfig) else AugmentConfig(preset=str(aug))
    for key in overrides:
        if key not in _PARTS:
            raise UserError(unknown_name_message("augmentation part", key, list(_PARTS)))
    cfg = dataclasses.replace(cfg, **overrides)
    base = _PRESETS.get(cfg.preset)()
    given = {k: getattr(cfg, k) for k in _PARTS if getattr(cfg, k) is not None}
    if given.get("auto_augment") == "":
        given["auto_augment"] = "none"
    if base is None:
        if given:
            raise UserError(f"augmentation preset 'none' is the eval transform and takes no parts "
                            f"(got {', '.join(given)}); start from a preset such as 'basic'")
        return cfg
    out = AugmentConfig(preset=cfg.preset, **{**base, **given})
    _check(out)
    return out


def _check(cfg: AugmentConfig) -> None:
    """Raise a UserError for out-of-range part values (before any long work starts)."""
    def bad(name: str, why: str) -> UserError:
        return UserError(f"augmentation {name}={getattr(cfg, name)!r}: {why}")

    for name in ("hflip", "vflip", "gaussian_blur", "random_erasing"):
        if not 0.0 <= float(getattr(cfg, name)) <= 1.0:
            raise bad(name, "a probability must be in [0, 1]")
    for name in ("rotation", "color_jitter", "gaussian_noise"):
        if float(getattr(cfg, name)) < 0.0:
            raise bad(name, "must be >= 0")
    for name, top in (("scale", 1.0), ("ratio", float("inf"))):
        pair = tuple(getattr(cfg, name))
        if len(pair) != 2 or not 0.0 < pair[0] <= pair[1] <= top:
            raise bad(name, f"needs two numbers 0 < lo <= hi{' <= 1' if top == 1.0 else ''}")
    if cfg.auto_augment != "none":
        _policy_factory(str(cfg.auto_augment))  # unknown policy -> UserError with suggestions


def create_transform(data_config: dict, *, is_training: bool, aug: Union[str, AugmentConfig] = "basic",
                     **overrides: Any) -> Callable:
    """Build a transform from a timm data config: PIL image -> normalised ``(3, H, W)`` tensor.

    Args:
        data_config: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``.
        is_training: Random augmentation (``aug``) when true, resize + centre crop otherwise
            (``aug`` and ``overrides`` are then ignored).
        aug: Preset name (:func:`list_augmentations`) or an :class:`AugmentConfig`.
        overrides: Single parts replacing the preset's, e.g. ``rotation=15, random_erasing=0.25``
            (the fields of :class:`AugmentConfig`).
    """
    if not is_training:
        return _eval_transform(data_config)
    cfg = resolve_augment(aug, **overrides)
    if _PRESETS.get(cfg.preset)() is None:  # the `none` preset
        return _eval_transform(data_config)
    return _train_transform(cfg, data_config)


def _eval_transform(data_config: dict) -> Callable:
    from timm.data import create_transform as timm_create_transform

    keys = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
    return timm_create_transform(**{k: data_config[k] for k in keys if k in data_config}, is_training=False)


def _train_transform(cfg: AugmentConfig, data_config: dict) -> Callable:
    from timm.data.transforms import MaybeToTensor, str_to_interp_mode
    from torchvision import transforms as T

    size = tuple(int(s) for s in data_config.get("input_size", (3, 224, 224))[-2:])
    mean = tuple(float(m) for m in data_config.get("mean", _IMAGENET_MEAN))
    std = tuple(float(s) for s in data_config.get("std", _IMAGENET_STD))
    interpolation = data_config.get("interpolation") or "bilinear"
    interpolation = "bilinear" if interpolation == "random" else interpolation
    fill = [round(255 * m) for m in mean]
    tfl: list[Callable] = [T.RandomResizedCrop(size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                               interpolation=str_to_interp_mode(interpolation))]
    if cfg.hflip > 0:
        tfl.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        tfl.append(T.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation > 0:
        tfl.append(T.RandomRotation(float(cfg.rotation), interpolation=T.InterpolationMode.BILINEAR, fill=fill))
    if cfg.auto_augment != "none":
        tfl.append(_policy_factory(cfg.auto_augment)(cfg.auto_augment, size, fill, interpolation))
    if cfg.color_jitter > 0:
        tfl.append(T.ColorJitter(*(float(cfg.color_jitter),) * 3))
    if cfg.gaussian_blur > 0:
        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)  # odd, ~10% of the side
        tfl.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.gaussian_blur))
    tfl.append(MaybeToTensor())
    if cfg.gaussian_noise > 0:
        tfl.append(GaussianNoise(float(cfg.gaussian_noise)))
    tfl.append(T.Normalize(mean, std))
    if cfg.random_erasing > 0:
        tfl.append(T.RandomErasing(p=cfg.random_erasing, value=0))  # 0 = mean colour once normalised
    return T.Compose(tfl)


class GaussianNoise(torch.nn.Module):
    """Add ``N(0, sigma^2)`` noise to a ``[0, 1]`` float image tensor and clip to ``[0, 1]``."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img + self.sigma * torch.randn_like(img)).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


@contextlib.contextmanager
def torch_seeded_rng() -> Iterator[None]:
    """Seed python's and numpy's global RNGs from torch's inside the block, restore them after.

    Makes code that draws from ``random``/``numpy`` (timm's policies and Mixup) follow
    ``torch.manual_seed``. Not thread-safe (global state), which DataLoader workers -- processes --
    do not need.
    """
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TorchSeeded:
    """Run ``transform`` under :func:`torch_seeded_rng` (a class so DataLoader workers can pickle it)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        with torch_seeded_rng():
            return self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def _policy_factory(spec: str) -> Callable:
    """Factory ``(spec, size, fill, interpolation) -> PIL transform`` for an auto_augment string."""
    return _POLICIES.get(spec.split("-")[0])


def _timm_policy(builder: str, **extra: Any) -> Callable:
    """A timm ``timm.data.auto_augment.<builder>(spec, hparams)`` policy, run under torch's RNG."""
    def factory(spec: str, size: tuple[int, int], fill: list[int], interpolation: str) -> Callable:
        from timm.data import auto_augment
        from timm.data.transforms import str_to_pil_interp

        hparams = dict(translate_const=int(min(size) * 0.45), img_mean=tuple(fill), **extra,
                       interpolation=str_to_pil_interp(interpolation))
        try:
            return TorchSeeded(getattr(auto_augment, builder)(spec, hparams))
        except (AssertionError, ValueError, KeyError) as e:
            raise UserError(f"bad auto_augment '{spec}': {e or type(e).__name__}") from None
    return factory


def _torchvision_policy(build: Callable) -> Callable:
    """A torchvision policy ``build(transforms_module, interpolation_mode, fill)`` (no options)."""
    def factory(spec: str, size: tuple[int, int], fill: list[int], interpolation: str) -> Callable:
        from timm.data.transforms import str_to_interp_mode
        from torchvision import transforms as T

        if "-" in spec:
            raise UserError(f"auto_augment '{spec.split('-')[0]}' takes no options (got '{spec}')")
        return build(T, str_to_interp_mode(interpolation), fill)
    return factory


_POLICIES.register("rand")(_timm_policy("rand_augment_transform"))
_POLICIES.register("augmix")(_timm_policy("augment_and_mix_transform", translate_pct=0.3))
for _name in ("original", "originalr", "v0", "v0r", "3a"):
    _POLICIES.register(_name)(_timm_policy("auto_augment_transform"))
_POLICIES.register("autoaugment")(_torchvision_policy(
    lambda T, mode, fill: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=mode, fill=fill)))
_POLICIES.register("trivialaugment")(_torchvision_policy(
    lambda T, mode, fill: T.TrivialAugmentWide(interpolation=mode, fill=fill)))
