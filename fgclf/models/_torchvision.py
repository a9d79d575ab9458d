"""torchvision classifiers by name (``tv:resnet50``), behind timm's model contract.

``TorchvisionClassifier`` holds the torchvision model with its last ``nn.Linear`` (the
classifier: ``fc``, ``classifier[-1]``, ``heads.head``, ...) replaced by ``nn.Identity`` as
``body``, and that layer as ``head``. It offers what fgclf relies on from timm models:
``forward_features`` (pooled pre-logits features), ``forward_head(x, pre_logits=False)``,
``get_classifier``, ``reset_classifier``, ``num_classes``, ``num_features``, ``drop_rate``
(dropout on the pooled features, as timm) and a
``pretrained_cfg`` with the input size, mean/std, crop and interpolation of the torchvision
weights, so data pipelines, linear probes, cached features, exports and PEFT work unchanged.
``partial:N`` is timm-only (it needs timm's stage grouping).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fgclf.errors import UserError

PREFIX = "tv:"


def list_torchvision_models() -> list[str]:
    """``tv:``-prefixed names of torchvision's image classifiers."""
    from torchvision import models

    return [PREFIX + n for n in models.list_models(module=models)]


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier")
    return found[-1]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _data_cfg(weights_enum: Any) -> dict[str, Any]:
    """timm-style data config from the torchvision weights' eval transform (no download)."""
    tf = weights_enum.DEFAULT.transforms()
    crop = int(tf.crop_size[0])
    resize = int(tf.resize_size[0])
    interp = str(getattr(tf.interpolation, "value", tf.interpolation)).lower()
    return {"input_size": (3, crop, crop), "mean": tuple(tf.mean), "std": tuple(tf.std),
            "crop_pct": crop / resize, "crop_mode": "center", "interpolation": interp}


class TorchvisionClassifier(nn.Module):
    """A torchvision classifier split into ``body`` (features) and ``head`` (Linear)."""

    def __init__(self, model: nn.Module, *, architecture: str, data_cfg: dict[str, Any],
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.head_drop = nn.Dropout(drop_rate)  # timm's drop_rate: dropout on the pooled features
        name, linear = _last_linear(model)
        _set_module(model, name, nn.Identity())
        self.body = model
        self.head = linear
        self.num_features = linear.in_features
        self.num_classes = linear.out_features
        self.pretrained_cfg = {"architecture": architecture, "classifier": "head", "num_classes": self.num_classes,
                               **data_cfg}
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x):
        out = self.body(x)
        return getattr(out, "logits", out)  # GoogLeNet / Inception v3 return (logits, aux) tuples in training

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def create_torchvision_model(name: str, *, num_classes: int | None, pretrained: bool,
                             kwargs: dict[str, Any]) -> TorchvisionClassifier:
    """Build ``tv:<arch>``: torchvision's DEFAULT ImageNet weights when ``pretrained``."""
    from torchvision import models

    from fgclf.models._factory import _OFFLINE_HINT, _download_errors
    from fgclf.registry import unknown_name_message

    arch = name[len(PREFIX):]
    known = models.list_models(module=models)
    if arch not in known:
        raise UserError(unknown_name_message("torchvision model", arch, known))
    kwargs = dict(kwargs)
    drop = kwargs.pop("drop_rate", None)
    if kwargs.pop("drop_path_rate", None):
        raise UserError(f"drop_path_rate is not an option of torchvision's {arch}")
    weights_enum = models.get_model_weights(arch)
    try:
        model = models.get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
    except _download_errors() as e:
        raise UserError(f"could not download torchvision weights for '{arch}' (offline?); {_OFFLINE_HINT} "
                        f"[{type(e).__name__}]") from None
    except TypeError as e:
        raise UserError(f"torchvision's {arch} rejected an option: {e}") from None
    wrapped = TorchvisionClassifier(model, architecture=name, data_cfg=_data_cfg(weights_enum),
                                    drop_rate=float(drop or 0.0))
    if num_classes is not None and num_classes != wrapped.num_classes:
        wrapped.reset_classifier(num_classes)
    return wrapped
