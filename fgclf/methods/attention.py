"""Attention cropping: WS-DAN and CAL.

* WS-DAN: Hu, Qi, Huang and Lu, "See Better Before Looking Closer: Weakly Supervised Data
  Augmentation Network for Fine-Grained Visual Classification", arXiv:1901.09891 (2019).
  Official TensorFlow code tau-yihouxiang/WS_DAN; this follows the PyTorch port GuYuc/WS-DAN.PyTorch
  (``models/wsdan.py``, ``train.py``, ``utils.py``) where they differ, as CAL's code does.
* CAL: Rao, Chen, Lu and Zhou, "Counterfactual Attention Learning for Fine-Grained Visual
  Categorization and Re-identification", ICCV 2021; official code raoyongming/CAL (``fgvc/``).

The network: ``M`` attention maps ``A = ReLU(BN(conv1x1(F)))`` over the backbone's feature map
``F``; bilinear attention pooling (BAP) ``f = normalize(ssqrt(einsum(A, F) / HW))`` (an ``M x C``
feature matrix); logits ``W (100 f)`` with a bias-free linear layer.

A training step (:class:`WSDAN`): the raw images; an attention *crop* (the box around where one
attention map, picked with probability ~ sqrt of its mean, exceeds ``U(0.4, 0.6)`` of its maximum,
padded by 10 % and resized to the input size); an attention *drop* (another picked map's region
above ``U(0.2, 0.5)`` of its maximum set to zero); loss ``(CE_raw + CE_crop + CE_drop) / 3 +
center_weight * ||f - c_y||^2``, where the feature centres ``c_y`` (a buffer, saved with the model)
move as ``c_y <- c_y + beta (f - normalize(c_y))``. Inference averages the logits of the raw image
and of the crop around the mean attention map above 0.1 of its maximum (padding 5 %).

:class:`CAL` adds the counterfactual: the same pooling with random attention ``U(0, 2)`` gives
logits ``y_hat``, and the *effect* ``y - y_hat`` is trained with cross-entropy too, on all three
views (crop and drop share one forward pass, as in the official code); inference averages the raw
image and three crops (thresholds 0.3, 0.2, 0.1).

Deviations, each for a reason: the random choices (which maps, which thresholds, CAL's random
attention) come from ``StepContext.uniform`` so they belong to the sample, not the process or the
resume; the centre update sums the contributions of every sample of a class in the global batch
(the TensorFlow code's ``scatter_sub`` sums too; the PyTorch port keeps only one of them), so N
processes update as one does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import MethodModel, eval_forward, unwrap_to

EPS = 1e-12  # attention-map sampling weights sqrt(mean + EPS)


# ----------------------------------------------------------------------------- attention geometry
def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w) -> (B, H, W)`` bilinear with aligned corners (the PyTorch port's ``upsample_bilinear``)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]


def crop_boxes(maps: torch.Tensor, theta: torch.Tensor, padding: float, size: tuple[int, int]) -> torch.Tensor:
    """Boxes around the attended regions: ``(B, h, w)`` maps -> ``(B, 4)`` integer ``(y0, y1, x0, x1)``.

    Each map is upsampled to the image ``size``; the box spans the pixels where it reaches
    ``theta * max`` (theta per sample), widened by ``padding`` of the image side on each side and
    clipped to the image (end exclusive).
    """
    height, width = size
    up = _upsample(maps, size)
    mask = up >= theta.to(up)[:, None, None] * up.flatten(1).amax(1)[:, None, None]
    rows, cols = mask.any(2), mask.any(1)  # (B, H), (B, W); a max of 0 marks the whole image
    idx_h, idx_w = torch.arange(height, device=maps.device), torch.arange(width, device=maps.device)
    y0 = torch.where(rows, idx_h, height).amin(1)
    y1 = torch.where(rows, idx_h, -1).amax(1)
    x0 = torch.where(cols, idx_w, width).amin(1)
    x1 = torch.where(cols, idx_w, -1).amax(1)
    pad_h, pad_w = int(padding * height), int(padding * width)
    return torch.stack([(y0 - pad_h).clamp_min(0), (y1 + pad_h).clamp_max(height - 1) + 1,
                        (x0 - pad_w).clamp_min(0), (x1 + pad_w).clamp_max(width - 1) + 1], dim=1)


def attention_crop(images: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor, padding: float) -> torch.Tensor:
    """Each image cut to its attention box and resized back to the input size (bilinear, aligned corners)."""
    size = tuple(images.shape[-2:])
    boxes = crop_boxes(maps, theta, padding, size).tolist()
    crops = [F.interpolate(img[None, :, y0:y1, x0:x1], size=size, mode="bilinear", align_corners=True)
             for img, (y0, y1, x0, x1) in zip(images, boxes)]
    return torch.cat(crops)


def drop_mask(maps: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, H, W)`` mask that is 0 where the upsampled map reaches ``theta * max``, 1 elsewhere."""
    up = _upsample(maps, size)
    keep = up < theta.to(up)[:, None, None] * up.flatten(1).amax(1)[:, None, None]
    return keep[:, None].float()


def pick_maps(attention: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One map per sample, map ``k`` with probability ``sqrt(mean A_k)`` normalised (the official
    sampling), chosen by inverse CDF from the uniform ``u`` ``(B,)``: ``(B, M, h, w) -> (B, h, w)``."""
    weights = torch.sqrt(attention.detach().float().mean(dim=(2, 3)) + EPS)
    cdf = torch.cumsum(weights / weights.sum(1, keepdim=True), dim=1)
    index = torch.searchsorted(cdf, u.to(cdf)[:, None].contiguous()).clamp_max(attention.shape[1] - 1)[:, 0]
    return attention[torch.arange(attention.shape[0], device=attention.device), index]


def _between(u: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * u


# ----------------------------------------------------------------------------- the network
class AttentionModel(MethodModel):
    """Backbone -> M attention maps -> bilinear attention pooling -> bias-free linear layer (x100).

    Args:
        backbone: A timm model (CNN or ViT).
        num_classes: Classes.
        num_maps: Attention maps ``M`` (32 in both papers).
        eval_crops: ``(theta, padding)`` of each crop averaged with the raw view at inference.
    """

    new_modules = ("fg_attention", "fg_head")
    head_bias = False

    def __init__(self, backbone: nn.Module, num_classes: int, *, num_maps: int,
                 eval_crops: Sequence[Sequence[float]], sqrt_eps: float = 1e-12) -> None:
        super().__init__(backbone, num_classes)
        if num_maps < 1:
            raise UserError(f"method.num_maps must be >= 1, got {num_maps}")
        if not sqrt_eps > 0:
            raise UserError(f"method.sqrt_eps must be > 0, got {sqrt_eps}")
        self.num_maps, self.sqrt_eps = num_maps, float(sqrt_eps)
        self.eval_crops = [tuple(map(float, c)) for c in eval_crops]
        self.fg_attention = nn.Sequential(nn.Conv2d(self.channels, num_maps, kernel_size=1, bias=False),
                                       nn.BatchNorm2d(num_maps, eps=0.001), nn.ReLU(inplace=True))
        self.num_features = num_maps * self.channels
        self.fg_head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()
        self.register_buffer("feature_center", torch.zeros(num_classes, self.num_features))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.feature_center = torch.zeros(num_classes, self.num_features, device=self.feature_center.device)

    def bap(self, feature_map: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Bilinear attention pooling: ``(B, C, H, W), (B, M, H, W) -> (B, M C)``, averaged over
        locations, signed square root ``sign(x) sqrt(|x| + sqrt_eps)``, L2-normalised over the whole
        matrix (in float32)."""
        with torch.autocast(device_type=feature_map.device.type, enabled=False):
            f, a = feature_map.float(), attention.float()
            matrix = torch.einsum("bmhw,bchw->bmc", a, f) / (f.shape[2] * f.shape[3])
            matrix = torch.sign(matrix) * torch.sqrt(matrix.abs() + self.sqrt_eps)
            return F.normalize(matrix.flatten(1), dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.bap(x, self.fg_attention(x))
        return features if pre_logits else self.classify(features, x.dtype)

    def classify(self, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The bias-free linear layer on ``100 f``, in ``dtype`` (the backbone's: DeepSpeed bf16/fp16
        casts the weights, while BAP computes in float32)."""
        return self.fg_head((features * 100.0).to(dtype))

    def raw(self, x: torch.Tensor, random_attention: Optional[Callable] = None) -> dict:
        """One view: logits, the BAP features, the attention maps; with ``random_attention`` (a
        ``shape -> U(0, 1)`` draw) also CAL's counterfactual logits and effect."""
        fmap = self.feature_map(x)
        attention = self.fg_attention(fmap)
        features = self.bap(fmap, attention)
        logits = self.classify(features, fmap.dtype)
        out = {"logits": logits, "features": features, "attention": attention}
        if random_attention is not None:
            fake = 2.0 * random_attention(*attention.shape).to(attention)  # U(0, 2), the official draw
            out["effect"] = logits - self.classify(self.bap(fmap, fake), fmap.dtype)
        return out

    def forward(self, x: torch.Tensor, return_parts: bool = False,
                random_attention: Optional[Callable] = None):
        """Training: the raw view's logits (``return_parts``: the dict of :meth:`raw`). Evaluation:
        the method's inference, the logits of the raw view and of ``eval_crops`` averaged."""
        if return_parts or self.training:
            out = self.raw(x, random_attention)
            return out if return_parts else out["logits"]
        out = self.raw(x)
        views = [out["logits"]]
        mean_map = out["attention"].mean(dim=1)
        for theta, padding in self.eval_crops:
            crops = attention_crop(x, mean_map, torch.full((x.shape[0],), theta), padding)
            views.append(self.raw(crops)["logits"])
        return torch.stack(views).mean(0)


# ----------------------------------------------------------------------------- methods
class _AttentionMethod(Method):
    requires = frozenset({"feature_map", "hard_labels"})
    architecture = ("num_maps",)
    counterfactual = False

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        o = self.opts
        for key in ("crop_theta", "drop_theta"):
            low, high = o[key]
            if not 0 <= low <= high <= 1:
                raise UserError(f"method.{key} must be [low, high] with 0 <= low <= high <= 1, got {o[key]}")
        return AttentionModel(backbone, num_classes, num_maps=o["num_maps"], eval_crops=o["eval_crops"],
                              sqrt_eps=o["sqrt_eps"])

    def _update_centres(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                        ctx: StepContext) -> torch.Tensor:
        """The centre loss against the current (normalised) centres, then the centre update with the
        whole global batch's features (gathered), so every process applies the same update."""
        net = _unwrap(model)
        centres = F.normalize(net.feature_center[labels].float(), dim=-1)
        loss = (features.float() - centres).square().sum(1).mean()
        if ctx.replay:  # SAM's second pass over the same batch: the centres moved once already
            return loss
        with torch.no_grad():
            feats, labs = features.detach().float(), labels
            if ctx.num_processes > 1:
                feats, labs = ctx.accelerator.gather((feats, labs))
            current = F.normalize(net.feature_center[labs].float(), dim=-1)
            step = self.opts["beta"] * (feats - current)  # in the buffer's dtype (DeepSpeed may cast it to bf16)
            net.feature_center.index_add_(0, labs, step.to(net.feature_center.dtype))
        return loss

    def _views(self, images: torch.Tensor, attention: torch.Tensor, ctx: StepContext) -> tuple:
        """The attention crop and drop of the batch (no gradient), from per-sample draws."""
        o, b = self.opts, images.shape[0]
        with torch.no_grad():
            u = ctx.uniform(b, 4, device=images.device)
            crop_maps, drop_maps = pick_maps(attention, u[:, 0]), pick_maps(attention, u[:, 1])
            crops = attention_crop(images, crop_maps, _between(u[:, 2], o["crop_theta"]), o["crop_padding"])
            drops = images * drop_mask(drop_maps, _between(u[:, 3], o["drop_theta"]), tuple(images.shape[-2:]))
        return crops, drops.to(images.dtype)

    def draw(self, accelerator, model: nn.Module, images: torch.Tensor, path: Path) -> None:
        """A picture per epoch: each test image, its mean attention map and the inference crop
        (every process runs the forward pass, the main process writes ``path``)."""
        theta, padding = (self.opts["eval_crops"] or [(0.1, 0.05)])[-1]

        def mean_attention_and_crop(x: torch.Tensor) -> tuple:
            mean_map = model(x, return_parts=True)["attention"].mean(dim=1)
            thetas = torch.full((x.shape[0],), float(theta))
            return (mean_map, crop_boxes(mean_map, thetas, padding, tuple(x.shape[-2:])),
                    attention_crop(x, mean_map, thetas, padding))
        x, (mean_map, boxes, crops) = eval_forward(model, images, mean_attention_and_crop)
        if accelerator is None or accelerator.is_main_process:
            from fgclf.methods._pictures import attention_grid

            attention_grid(x.float().cpu(), _upsample(mean_map, tuple(x.shape[-2:])).cpu(), boxes.cpu(), crops.float().cpu(),
                           path,
                           title=f"{self.name}: mean attention, crop at {theta:g} x max (padding {padding:g})")


def _unwrap(model: nn.Module) -> AttentionModel:
    return unwrap_to(model, AttentionModel)


_ATTENTION_OPTIONS = {"num_maps": 32, "beta": 0.05, "center_weight": 1.0, "crop_theta": (0.4, 0.6),
                      "drop_theta": (0.2, 0.5), "crop_padding": 0.1, "eval_crops": ((0.1, 0.05),),
                      "sqrt_eps": 1e-12}


@register_method
class WSDAN(_AttentionMethod):
    """WS-DAN: attention cropping and dropping as augmentation, feature-centre loss, raw + crop inference."""

    name = "wsdan"
    options = dict(_ATTENTION_OPTIONS)
    paper = "Hu et al., See Better Before Looking Closer: Weakly Supervised Data Augmentation Network, 2019"

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        out = model(ctx.inputs(images), return_parts=True)
        ce_raw = self.criterion(out["logits"], labels)
        penalty, terms = self.penalty(out["logits"])
        center = self._update_centres(model, out["features"], labels, ctx)
        crops, drops = self._views(images, out["attention"], ctx)
        ce_crop = self.criterion(model(ctx.inputs(crops)), labels)
        ce_drop = self.criterion(model(ctx.inputs(drops)), labels)
        loss = (ce_raw + ce_crop + ce_drop) / 3 + self.opts["center_weight"] * center + penalty
        terms.update(ce_raw=ce_raw.detach(), ce_crop=ce_crop.detach(), ce_drop=ce_drop.detach(),
                     center=center.detach())
        return StepOutput(self.add_regularizer(model, loss), out["logits"], terms)


@register_method
class CAL(_AttentionMethod):
    """CAL: WS-DAN plus the counterfactual-attention effect trained with cross-entropy on every view."""

    name = "cal"
    options = {**_ATTENTION_OPTIONS, "eval_crops": ((0.3, 0.1), (0.2, 0.1), (0.1, 0.05)), "sqrt_eps": 1e-6}
    paper = "Rao et al., Counterfactual Attention Learning for Fine-Grained Visual Categorization, ICCV 2021"

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        b = images.shape[0]

        def random_attention(*shape: int) -> torch.Tensor:
            return ctx.uniform(shape[0], *shape[1:])

        out = model(ctx.inputs(images), return_parts=True, random_attention=random_attention)
        ce_raw, effect_raw = self.criterion(out["logits"], labels), self.criterion(out["effect"], labels)
        penalty, terms = self.penalty(out["logits"])
        center = self._update_centres(model, out["features"], labels, ctx)
        crops, drops = self._views(images, out["attention"], ctx)
        both = model(ctx.inputs(torch.cat([crops, drops])), return_parts=True,
                     random_attention=lambda *shape: torch.cat([random_attention(b, *shape[1:]),
                                                                random_attention(b, *shape[1:])]))
        two = torch.cat([labels, labels])
        ce_views = self.criterion(both["logits"], two)  # the mean of CE_crop and CE_drop
        effect_views = self.criterion(both["effect"], two)
        loss = ((ce_raw + 2 * ce_views) / 3 + (effect_raw + 2 * effect_views) / 3 + self.opts["center_weight"] * center
                + penalty)
        terms.update(ce_raw=ce_raw.detach(), ce_views=ce_views.detach(), effect=((effect_raw + 2 * effect_views) / 3)
                     .detach(), center=center.detach())
        return StepOutput(self.add_regularizer(model, loss), out["logits"], terms)
