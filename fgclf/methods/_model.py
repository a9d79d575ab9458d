"""The module a method builds around a timm backbone, behind timm's model contract.

:class:`MethodModel` holds the backbone (classifier removed) as ``backbone`` and the method's own
layers beside it; it keeps what the rest of fgclf relies on: ``pretrained_cfg`` (so the data
config resolves as for the backbone), ``forward_features`` / ``forward_head(pre_logits=)``,
``reset_classifier``, ``group_matcher`` (partial fine-tuning and layer decay see the backbone's
stages, with the method's layers as the last group) and ``no_weight_decay``. ``new_modules``
names the method's layers: they train under ``linear_probe``, stay fully trainable under PEFT
and take ``optim.head_lr_scale``. They are called ``fg_*`` (``fg_head``, ``fg_reduce``, ...) because
PEFT's ``modules_to_save`` matches module names by suffix: a layer called ``head`` would also
catch EfficientNet's ``conv_head``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from fgclf.errors import UserError


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """The input size a model is built for: a ViT's ``patch_embed.img_size``, else its pretrained config's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        size = (size[0], *img_size)
    return size


def to_feature_map(backbone: nn.Module, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """``forward_features`` output as an NCHW map: CNN maps as they are, NHWC maps (Swin) permuted,
    a ViT's tokens without its prefix (class/register) tokens laid out on the patch grid (timm's
    ``patch_embed``, or an hf: model's ``feature_grid``)."""
    if feats.ndim == 4:
        return feats.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else feats
    if feats.ndim == 3 and hasattr(backbone, "feature_grid"):  # an hf: model (fgclf/models/_hf.py)
        tokens = feats[:, backbone.num_prefix_tokens:]
        h, w = backbone.feature_grid(image_hw)
        if h * w != tokens.shape[1]:
            raise UserError(f"{type(backbone).__name__}: {tokens.shape[1]} patch tokens do not form a {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    if feats.ndim == 3 and hasattr(backbone, "patch_embed"):
        tokens = feats[:, getattr(backbone, "num_prefix_tokens", 0):]
        pe = backbone.patch_embed
        h, w = pe.dynamic_feat_size(image_hw) if hasattr(pe, "dynamic_feat_size") else pe.grid_size
        if h * w != tokens.shape[1]:
            raise UserError(f"{type(backbone).__name__}: {tokens.shape[1]} patch tokens do not form a {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    raise UserError(f"{type(backbone).__name__}.forward_features gives a {tuple(feats.shape)} tensor, not a feature "
                    "map or patch tokens; this method needs a CNN or ViT-style backbone")


def _used_parameters(outputs: list[torch.Tensor]) -> set[int]:
    """ids of the parameters the autograd graphs of ``outputs`` reach (no backward pass)."""
    seen, used, stack = set(), set(), [o.grad_fn for o in outputs]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold the leaf tensor
        if var is not None:
            used.add(id(var))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return used


def last_feature_map(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``[forward_features(x)]`` as an NCHW map (what most methods pool)."""
    return [to_feature_map(backbone, backbone.forward_features(x), tuple(x.shape[-2:]))]


def prepare_backbone(backbone: nn.Module, features: Callable[[nn.Module, torch.Tensor], list] = last_feature_map,
                     image_hw: Optional[tuple[int, int]] = None) -> tuple[list[int], list[str]]:
    """Remove ``backbone``'s classifier and freeze the parameters that ``features`` never uses.

    The backbone's own pooling head may keep parameters after ``reset_classifier(0)`` (a ViT's
    ``fc_norm``, ConvNeXt's ``head.norm``), and a method reading intermediate stages skips the
    layers after them (EfficientNet's ``conv_head``); under DDP a trainable parameter without a
    gradient is an error. One eval-mode forward pass of a zero image at the model's input size
    finds them (and the channel counts).

    Args:
        backbone: A timm model.
        features: ``(backbone, images) -> list of NCHW maps`` the method uses.
        image_hw: Size of the probe image (default: the model's input size).

    Returns:
        (channels of each map, names of the parameters frozen).
    """
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "reset_classifier"):
        raise UserError(f"{type(backbone).__name__} does not follow timm's model contract (forward_features, "
                        "reset_classifier); methods other than plain need a timm backbone")
    backbone.reset_classifier(0)
    size = input_size_of(backbone)
    if image_hw is not None:
        size = (size[0], *image_hw)
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            probe = torch.zeros(1, *size, dtype=param.dtype, device=param.device, requires_grad=True)
            maps = features(backbone, probe)
    finally:
        backbone.train(was_training)
    used = _used_parameters(maps)
    unused = [n for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in used]
    for name, p in backbone.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return [int(m.shape[1]) for m in maps], unused


def unwrap_to(model: nn.Module, cls: type) -> nn.Module:
    """The ``cls`` module inside DDP, DeepSpeed, ``torch.compile`` and PEFT wrappers."""
    net = model
    while not isinstance(net, cls):
        if callable(getattr(net, "get_base_model", None)):  # peft.PeftModel
            net = net.get_base_model()
        elif hasattr(net, "module"):  # DDP, DeepSpeed's engine
            net = net.module
        elif hasattr(net, "_orig_mod"):  # torch.compile
            net = net._orig_mod
        else:
            raise TypeError(f"no {cls.__name__} inside {type(model).__name__}")
    return net


class MethodModel(nn.Module):
    """A backbone plus a method's layers; subclasses define ``forward_head`` (and ``forward``).

    Args:
        backbone: A timm model; its classifier is removed and its unused head parameters frozen.
        num_classes: Classifier outputs.

    Attributes:
        channels: Channels of the backbone's feature map.
        new_modules: Names of the method's layers (set by subclasses; ``fg_head`` last).
    """

    new_modules: tuple[str, ...] = ("fg_head",)
    classifier_name: str = "fg_head"  # the final Linear (zero-initialised on a pretrained body, reset by reset_classifier)
    head_bias: bool = True

    def __init__(self, backbone: nn.Module, num_classes: int,
                 features: Callable[[nn.Module, torch.Tensor], list] = last_feature_map,
                 image_hw: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        channels, self.unused_backbone_params = prepare_backbone(backbone, features, image_hw)
        self.channels = channels[-1]  # of the last map
        self.stage_channels = channels
        self.backbone = backbone
        self.num_classes = num_classes
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        cfg.update(classifier=self.classifier_name, num_classes=num_classes, input_size=input_size_of(backbone))
        self.pretrained_cfg = cfg
        self.default_cfg = cfg

    # ------------------------------------------------------------------ timm contract
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, NCHW."""
        return to_feature_map(self.backbone, self.backbone.forward_features(x), tuple(x.shape[-2:]))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fg_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: an Identity, so ``forward`` gives the pooled features)."""
        in_features = self.num_features
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.fg_head = nn.Linear(in_features, num_classes, bias=self.head_bias) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple]:
        """timm's grouping of the backbone's parameters (stem, stages) under ``backbone.``; the method's
        layers come last, where a plain model's head would be."""
        from timm.models import group_parameters

        order: dict[str, int] = {}
        if hasattr(self.backbone, "group_matcher"):
            for gid, names in group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse)).items():
                order.update({f"backbone.{n}": gid for n in names})

        def match(name: str) -> tuple:
            return (order[name],) if name in order else (float("inf"),)
        return match

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in (names() if callable(names) else ())}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)


class PartsModel(MethodModel):
    """A method model whose ``parts(x)`` computes everything at once (a dict with the prediction's
    ``logits``, its pre-logits ``features`` and what the method's losses need); ``forward(x,
    return_parts=True)`` returns that dict, ``forward(x)`` the logits."""

    def parts(self, x: torch.Tensor) -> dict:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-logits feature the final classifier ``fg_head`` sees (feature extraction's)."""
        return self.parts(x)["features"]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fg_head(x)

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        out = self.parts(x)
        return out if return_parts else out["logits"]


def eval_forward(model: nn.Module, images: torch.Tensor, run: Callable[[torch.Tensor], object]) -> tuple:
    """``run(x)`` in eval mode without gradients, ``x`` the ``images`` on the weights' device and in
    their dtype (DeepSpeed bf16/fp16); the model's training mode is restored. Returns ``(x, result)``
    (the methods' pictures: every process runs the forward pass, the main process draws)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            x = images.to(device=param.device, dtype=param.dtype)
            return x, run(x)
    finally:
        model.train(was_training)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 1x1 convolution, BatchNorm and ReLU: the channel reduction of B-CNN/iSQRT-COV and WS-DAN's
    attention layer."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
