"""Image-quality measures for generated images: FID and KID on frozen-network features.

Both compare the feature distribution of generated ("fake") images with that of real images:

- FID (Frechet Inception Distance): the Frechet distance between Gaussians fitted to the two
  feature sets, ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``. Lower is better; it is
  biased upwards for small sets (the bias grows with feature dimension / sample count), so only
  compare FIDs computed with the same extractor on the same numbers of images.
- KID (Kernel Inception Distance): the unbiased MMD^2 with the polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (mean and std reported). It is
  unbiased, so it is the better number for a few hundred images.

The math is torchmetrics' (``FrechetInceptionDistance`` / ``KernelInceptionDistance``, float64);
features are extracted once (:func:`extract_features`) and handed to both metrics through a
pass-through module, so the per-class numbers reuse the same features.

Extractors (:func:`create_feature_extractor`) take float images in ``[0, 1]`` of any size:

- ``inception``: InceptionV3 pool3 (2048-d), torch-fidelity's TF-ported weights through
  torchmetrics -- the FID of papers. Needs ``torch-fidelity`` and a weight download.
- ``effnet_lite0``: fgclf's offline-pretrained EfficientNet-Lite0 pooled pre-logits (1280-d).
  Works offline; its numbers are NOT comparable with Inception FIDs from the literature.
- ``auto``: inception when it can be built, else effnet_lite0.
"""
from __future__ import annotations

import contextlib
import io
import socket
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fgclf.errors import UserError

EXTRACTORS = ("auto", "inception", "effnet_lite0")
LITE0_MODEL = "tf_efficientnet_lite0.pypi_in1k"
DEFAULT_KID_SUBSET_SIZE = 1000
Images = Union[torch.Tensor, Iterable[Any]]


class FeatureExtractor(nn.Module):
    """Float images in ``[0, 1]``, ``[N, 3, H, W]`` -> features ``[N, num_features]``.

    Preprocessing: bilinear resize to ``input_size`` (when given and different), then either
    ``(x - mean) / std`` or, with ``to_uint8``, rounding to uint8 ``0..255`` (the Inception input).

    Args:
        body: The network; its output is flattened to ``[N, D]``.
        name: Extractor name, recorded with every number it produces.
        num_features: Feature dimension ``D``.
        input_size: ``(H, W)`` the body expects, or None to pass images at their own size.
        mean, std: Per-channel normalisation (ignored with ``to_uint8``); None = none.
        to_uint8: Feed ``round(255 * x)`` as uint8 instead of normalised floats.
    """

    def __init__(self, body: nn.Module, *, name: str, num_features: int,
                 input_size: Optional[Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, to_uint8: bool = False) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.num_features = int(num_features)
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.to_uint8 = to_uint8
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        if self.to_uint8:
            x = (x * 255).round().clamp(0, 255).to(torch.uint8)
        elif self.mean is not None:
            x = (x - self.mean) / self.std
        return self.body(x).reshape(x.shape[0], -1)


def _inception(device, weights: Optional[str]) -> FeatureExtractor:
    """torchmetrics' InceptionV3 (torch-fidelity ``inception-v3-compat``, pool3 = 2048-d)."""
    fallback = "use the offline extractor effnet_lite0 instead (numbers are not comparable with Inception FIDs)"
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as err:
        raise UserError(f"inception features need torchmetrics ({err}); {fallback}") from None
    if not _TORCH_FIDELITY_AVAILABLE:
        raise UserError(f"inception features need torch-fidelity (pip install torch-fidelity); {fallback}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable GitHub must not hang the weight download forever
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights)
    except Exception as err:  # noqa: BLE001 - offline, blocked, corrupt cache: all mean "no inception"
        raise UserError(f"cannot load the InceptionV3 weights ({type(err).__name__}: {err}); "
                        f"download them once with internet access or {fallback}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    # torch-fidelity resizes to 299 itself (TF-compatible bilinear) and wants uint8 input
    return FeatureExtractor(net, name="inception", num_features=2048, to_uint8=True).to(device).eval()


def _effnet_lite0(device) -> FeatureExtractor:
    """fgclf's offline EfficientNet-Lite0: pooled 1280-d pre-logits at the model's input size."""
    from fgclf.models import create_model, resolve_data_config

    model = create_model(LITE0_MODEL, num_classes=0, pretrained=True).eval()
    cfg = resolve_data_config(model)
    return FeatureExtractor(model, name="effnet_lite0", num_features=model.num_features,
                            input_size=tuple(cfg["input_size"][1:]), mean=cfg["mean"], std=cfg["std"]
                            ).to(device).eval()


def create_feature_extractor(name: str = "auto", *, device: Optional[Union[str, torch.device]] = None,
                             inception_weights: Optional[str] = None) -> FeatureExtractor:
    """A frozen feature extractor for FID/KID, in eval mode without gradients.

    Args:
        name: ``inception``, ``effnet_lite0`` or ``auto`` (inception when its package and weights
            are available, else effnet_lite0, without a message: read ``.name`` afterwards).
        device: Where it runs (default CPU).
        inception_weights: Local ``.pth`` of torch-fidelity's InceptionV3 weights (skips the download).

    Returns:
        A :class:`FeatureExtractor` with ``name`` and ``num_features`` attributes.

    Raises:
        UserError: unknown name; ``inception`` unavailable (the message names the fallback).
    """
    if name not in EXTRACTORS:
        raise UserError(f"unknown feature extractor '{name}'; known: {', '.join(EXTRACTORS)}")
    device = torch.device(device or "cpu")
    if name == "inception":
        extractor = _inception(device, inception_weights)
    elif name == "effnet_lite0":
        extractor = _effnet_lite0(device)
    else:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # quiet: no "Downloading ..." for a fallback
                extractor = _inception(device, inception_weights)
        except UserError:
            extractor = _effnet_lite0(device)
    extractor.requires_grad_(False)
    return extractor


# ----------------------------------------------------------------------------- features
def _batches(images: Images, batch_size: int):
    """Yield ``(images, labels or None)`` from a tensor or an iterable of batches / (images, labels)."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size], None
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _check_images(x: Any) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"expected image batches of shape [N, 3, H, W], got {shape}")
    if not x.is_floating_point():
        raise UserError(f"expected float images in [0, 1], got dtype {x.dtype} (divide uint8 images by 255)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError(f"expected float images in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}] "
                        "(undo the mean/std normalisation: extractors normalise themselves)")


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(images: Images, *, extractor: nn.Module, batch_size: int = 64,
                     return_labels: bool = False):
    """Features of every image, in order, as a float64 CPU tensor ``[N, D]``.

    Args:
        images: Float tensor ``[N, 3, H, W]`` in ``[0, 1]``, or an iterable of such batches or of
            ``(images, labels, ...)`` tuples (a DataLoader).
        extractor: Any module mapping such batches to ``[n, D]`` (run in eval mode).
        batch_size: Forward batch size for a tensor input.
        return_labels: Also return the labels of ``(images, labels)`` batches (int64 ``[N]``).

    Returns:
        ``features`` or ``(features, labels)``.
    """
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    was_training = extractor.training
    extractor.eval()
    device = _module_device(extractor)
    feats, labels = [], []
    try:
        for x, y in _batches(images, batch_size):
            _check_images(x)
            if len(x) == 0:
                continue
            feats.append(extractor(x.to(device)).reshape(len(x), -1).double().cpu())
            if return_labels:
                if y is None:
                    raise UserError("return_labels needs (images, labels) batches")
                labels.append(torch.as_tensor(y, dtype=torch.int64).reshape(-1))
    finally:
        extractor.train(was_training)
    dim = int(getattr(extractor, "num_features", 0) or 0)
    out = torch.cat(feats) if feats else torch.zeros(0, dim, dtype=torch.float64)
    if return_labels:
        return out, (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))
    return out


# ----------------------------------------------------------------------------- FID / KID
class _Precomputed(nn.Module):
    """Hands already-extracted features to torchmetrics unchanged (its ``feature`` module)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, kid_subset_size: Optional[int] = None,
                          kid_subsets: int = 100, seed: int = 0) -> dict[str, Any]:
    """FID and KID between two feature sets ``[N, D]`` (torchmetrics' formulas, float64).

    Args:
        real, fake: Features of the real and generated images (same ``D``).
        kid_subset_size: Images per KID subset; default ``min(1000, n_real, n_fake)``, and never
            more than the smaller set.
        kid_subsets: Number of random KID subsets.
        seed: Seed of the KID subset draws (the global torch RNG is left untouched).

    Returns:
        ``{"fid", "kid_mean", "kid_std", "feature_dim", "n_real", "n_fake", "kid_subset_size"}``.

    Raises:
        UserError: fewer than 2 images on either side, mismatched dimensions, bad KID settings.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real.double().cpu(), fake.double().cpu()
    n_real, n_fake = len(real), len(fake)
    if n_real < 2 or n_fake < 2:
        raise UserError(f"FID/KID need at least 2 real and 2 generated images, "
                        f"got {n_real} real and {n_fake} generated")
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}")
    if kid_subsets < 1:
        raise UserError("kid_subsets must be >= 1")
    if kid_subset_size is not None and kid_subset_size < 2:
        raise UserError("kid_subset_size must be >= 2")
    subset = min(kid_subset_size or DEFAULT_KID_SUBSET_SIZE, n_real, n_fake)
    dim = int(real.shape[1])
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID keeps all features in memory": we hold them anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws subsets with the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "feature_dim": dim, "n_real": n_real, "n_fake": n_fake, "kid_subset_size": subset}


def _extractor_name(extractor: nn.Module) -> str:
    return str(getattr(extractor, "name", type(extractor).__name__))


def compute_fid_kid(real: Images, fake: Images, *, extractor: nn.Module, kid_subset_size: Optional[int] = None,
                    kid_subsets: int = 100, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """FID and KID of generated images against real ones.

    Args:
        real, fake: Float images ``[N, 3, H, W]`` in ``[0, 1]``, or iterables of such batches or of
            ``(images, labels)`` tuples (DataLoaders); both go through the same extractor.
        extractor: From :func:`create_feature_extractor`, or any module with ``num_features``.
        kid_subset_size, kid_subsets, seed: See :func:`fid_kid_from_features`.
        batch_size: Forward batch size for tensor inputs.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "extractor", "feature_dim", "n_real", "n_fake",
        "kid_subset_size"}``.
    """
    out = fid_kid_from_features(extract_features(real, extractor=extractor, batch_size=batch_size),
                                extract_features(fake, extractor=extractor, batch_size=batch_size),
                                kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    return {**out, "extractor": _extractor_name(extractor)}


def per_class_from_features(real_by_class: dict[str, torch.Tensor], fake_by_class: dict[str, torch.Tensor], *,
                            kid_subset_size: Optional[int] = None, kid_subsets: int = 100,
                            seed: int = 0) -> dict[str, Any]:
    """Per-class and overall FID/KID from features grouped by class name.

    Every class of ``fake_by_class`` gets an entry (None when either side has < 2 images);
    ``overall`` compares all real features with all generated ones.

    Returns:
        ``{"overall": {...}, "per_class": {class_name: {...} or None}}``.

    Raises:
        UserError: a generated class that has no real counterpart.
    """
    unknown = sorted(set(fake_by_class) - set(real_by_class))
    if unknown:
        raise UserError(f"generated classes not among the real classes: {', '.join(unknown[:5])}")
    per_class = {}
    for name, fake in fake_by_class.items():
        real = real_by_class[name]
        per_class[name] = (fid_kid_from_features(real, fake, kid_subset_size=kid_subset_size,
                                                 kid_subsets=kid_subsets, seed=seed)
                           if len(real) >= 2 and len(fake) >= 2 else None)
    overall = fid_kid_from_features(torch.cat(list(real_by_class.values())), torch.cat(list(fake_by_class.values())),
                                    kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    return {"overall": overall, "per_class": per_class}


def compute_quality_per_class(real_by_class: dict[str, Images], fake_by_class: dict[str, Images], *,
                              extractor: nn.Module, kid_subset_size: Optional[int] = None, kid_subsets: int = 100,
                              batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """FID/KID per class and overall, each image's features extracted once.

    Per-class FID rests on few images (often fewer than the feature dimension, so the
    covariances are singular): it is strongly biased upwards and only comparable between runs
    with the same class sizes and extractor. Per-class KID is unbiased but noisy at that size.

    Args:
        real_by_class, fake_by_class: Class name -> images (as for :func:`compute_fid_kid`).
            Every generated class must exist among the real ones.
        extractor, kid_subset_size, kid_subsets, batch_size, seed: As for :func:`compute_fid_kid`.

    Returns:
        ``{"overall": {...}, "per_class": {name: {...} or None}, "extractor", "feature_dim"}``;
        a class with < 2 real or generated images gets None.
    """
    unknown = sorted(set(fake_by_class) - set(real_by_class))
    if unknown:
        raise UserError(f"generated classes not among the real classes: {', '.join(unknown[:5])}")
    real = {c: extract_features(v, extractor=extractor, batch_size=batch_size) for c, v in real_by_class.items()}
    fake = {c: extract_features(v, extractor=extractor, batch_size=batch_size) for c, v in fake_by_class.items()}
    out = per_class_from_features(real, fake, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    return {**out, "extractor": _extractor_name(extractor), "feature_dim": out["overall"]["feature_dim"]}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Reference Frechet distance of two Gaussians in numpy/scipy (pytorch-fid's formula).

    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2))``; a tiny diagonal
    offset is added when the product is singular enough for ``sqrtm`` to fail.

    Returns:
        The distance as a float.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


__all__ = [
    "EXTRACTORS", "FeatureExtractor", "compute_fid_kid", "compute_quality_per_class", "create_feature_extractor",
    "extract_features", "fid_kid_from_features", "frechet_distance", "per_class_from_features",
]
