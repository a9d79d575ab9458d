"""Class activation maps of a trained model (``scripts/explain.py``): Grad-CAM written here, the other
CAMs through the maintained ``grad-cam`` package (jacobgil/pytorch-grad-cam).

* :func:`target_layer`: the layer whose activations the map is made of: the last stage of a CNN
  (timm's ``feature_info``), a ViT's last block (its patch tokens laid out on the grid); for a
  method's model, that layer of its backbone;
* :func:`class_maps`: one map per image for a chosen class each (``gradcam``, ``gradcam++``,
  ``hirescam``, ``eigencam``, or ``finercam``: Finer-CAM, which subtracts the evidence for the most
  similar classes, made for fine-grained confusions), scaled to [0, 1] at the input size;
* :func:`attention_rollout`: attention rollout for ViTs (Abnar & Zuidema, "Quantifying Attention
  Flow in Transformers", ACL 2020): per layer the heads' attention (mean, or max/min as in
  jacobgil/vit-explain) plus the identity for the residual, rows renormalised, multiplied from the
  first layer up; the class token's row over the patch tokens is the map. Class-agnostic;
* :func:`most_confused`: the test images of the run's most confused class pairs;
* :func:`save_grid`: image | map of the predicted class | map of the true class, one row each.

The model's forward is its method's inference, so the maps explain the prediction the run made,
with one limit: a method that runs the backbone more than once per image (WS-DAN's and CAL's crop,
NTS-Net's parts) gets the map of the first pass, the whole image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError

CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "eigencam", "finercam")
HEAD_FUSIONS = ("mean", "max", "min")


def _cam_class(name: str):
    try:
        import pytorch_grad_cam as pgc
    except ImportError:
        raise UserError("explanation maps need the grad-cam package: pip install 'fgclf[explain]'") from None
    classes = {"gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM, "eigencam": pgc.EigenCAM,
               "finercam": pgc.FinerCAM}  # gradcam: fgclf's own grad_cam
    return classes[name]


def target_layer(model: nn.Module) -> tuple[nn.Module, Optional[Callable]]:
    """``(layer, reshape_transform)`` for the maps of ``model`` (see the module doc)."""
    backbone = getattr(model, "backbone", model)  # a method's model holds the timm model as .backbone
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks"):
        # TransFG's last block sees only the selected part tokens: the one before it has the whole grid
        block = backbone.blocks[-2] if type(model).__name__ == "TransFGModel" else backbone.blocks[-1]
        prefix = getattr(backbone, "num_prefix_tokens", 1)
        grid = getattr(backbone.patch_embed, "grid_size", None)

        def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
            t = t[:, prefix:]
            h, w = grid if grid is not None and grid[0] * grid[1] == t.shape[1] else (int(t.shape[1] ** 0.5),) * 2
            return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        return block.norm1, tokens_to_map
    if hasattr(backbone, "feature_grid"):  # an hf: model: the last block's first norm, its tokens on the grid
        prefix = backbone.num_prefix_tokens
        size = tuple(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))[-2:]
        grid = backbone.feature_grid(size)

        def hf_tokens_to_map(t: torch.Tensor) -> torch.Tensor:
            t = t[:, prefix:]
            h, w = grid if grid[0] * grid[1] == t.shape[1] else (int(t.shape[1] ** 0.5),) * 2
            return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        return backbone.cam_layer(), hf_tokens_to_map
    info = getattr(backbone, "feature_info", None)
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":  # Swin, MambaOut: channels last
            return backbone.get_submodule(last), lambda t: t.permute(0, 3, 1, 2)
        return backbone.get_submodule(last), None
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"{type(backbone).__name__}: no convolution or ViT block to draw a map from")
    return convs[-1], None


def class_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int], *, method: str = "gradcam",
               layer: Optional[nn.Module] = None, reshape: Optional[Callable] = None,
               batch_size: int = 16) -> np.ndarray:
    """``(N, H, W)`` maps in [0, 1] of ``classes[i]`` for ``images[i]`` (the model's own forward).
    ``gradcam`` is :func:`grad_cam`; the other methods come from the grad-cam package."""
    if method not in CAM_METHODS:
        raise UserError(f"unknown map {method!r}; known: {', '.join(CAM_METHODS)}")
    if layer is None:
        layer, reshape = target_layer(model)
    model.eval()
    if len(images) > batch_size:  # the activations and gradients of a whole folder at once would not fit
        return np.concatenate([class_maps(model, images[i:i + batch_size], classes[i:i + batch_size], method=method,
                                          layer=layer, reshape=reshape, batch_size=batch_size)
                               for i in range(0, len(images), batch_size)])
    if method == "gradcam":
        return grad_cam(model, images, classes, layer, reshape)
    cam_cls = _cam_class(method)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method == "finercam":
        cam = cam_cls(model=model, target_layers=[layer], reshape_transform=reshape)
        with cam:
            return np.stack([cam(input_tensor=images[i:i + 1], target_idx=int(c))[0] for i, c in enumerate(classes)])
    with cam_cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (1e-7 + maps.amax(dim=(-2, -1), keepdim=True))


def grad_cam(model: nn.Module, images: torch.Tensor, classes: Sequence[int], layer: nn.Module,
             reshape: Optional[Callable] = None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017): ``(N, H, W)`` maps in [0, 1] of ``classes[i]`` for ``images[i]``.

    The weights of ``layer``'s channels are the spatial mean of the class logit's gradient; the map is
    the ReLU of the weighted sum of its activations, scaled to [0, 1] per image, bilinearly resized to
    the input and scaled again: the conventions of jacobgil/pytorch-grad-cam's ``GradCAM``, which the
    tests compare it with. Written here so that a run's report needs neither that package nor the
    scikit-learn it imports, and the gradient is taken only down to ``layer``
    (``torch.autograd.grad``), not into every parameter. A layer that runs more than once per
    forward (a method's crop pass) gives the map of its first call.
    """
    device = next(model.parameters(), images).device
    first: list[torch.Tensor] = []

    def keep(module, args, out) -> None:
        if not first:
            first.append(out)

    if torch.is_inference_mode_enabled():
        raise UserError("Grad-CAM needs gradients: call it outside torch.inference_mode()")
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            # a copy (images made under inference_mode cannot require grad) in the graph, so the layer's output is
            x = images.to(device).detach().clone().requires_grad_(True)
            logits = model(x)
            if not first or not torch.is_tensor(first[0]):
                raise UserError(f"the map's layer ({type(layer).__name__}) gave no tensor in the model's forward "
                                f"({'it did not run' if not first else type(first[0]).__name__})")
            target = torch.as_tensor(list(classes), device=logits.device).view(-1, 1)
            grads = torch.autograd.grad(logits.gather(1, target).sum(), first[0])[0]
    finally:
        handle.remove()
    acts = first[0].detach()
    if reshape is not None:
        acts, grads = reshape(acts), reshape(grads)
    acts, grads = acts.float(), grads.float()
    cam = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1).clamp_min(0)
    cam = F.interpolate(_min_max(cam)[:, None], size=tuple(images.shape[-2:]), mode="bilinear",
                        align_corners=False)[:, 0]
    return _min_max(cam).cpu().numpy()


def _vit_backbone(model: nn.Module) -> nn.Module:
    """The model's ViT whose attention the rollout can recompute: timm's plain ``Attention`` (softmax
    of q k^T; BEiT's relative position bias, EVA's rotary embedding or CaiT's talking heads would need
    their own recomputation), else a UserError."""
    from timm.layers import Attention

    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not hasattr(backbone, "patch_embed"):
        raise UserError(f"attention rollout needs a ViT (timm blocks with attn.qkv); {type(backbone).__name__} "
                        "has none: use a CAM (--cam gradcam)")
    kinds = {type(getattr(b, "attn", None)) for b in blocks}
    if not all(k is not None and issubclass(k, Attention) for k in kinds):
        names = ", ".join(sorted(k.__module__ + "." + k.__name__ for k in kinds))
        raise UserError(f"attention rollout recomputes timm's plain ViT attention; {type(backbone).__name__} uses "
                        f"{names} (position biases or mixed heads it would leave out): use a CAM (--cam gradcam)")
    return backbone


def attention_rollout(model: nn.Module, images: torch.Tensor, *, head_fusion: str = "mean") -> np.ndarray:
    """``(N, H, W)`` attention rollout maps in [0, 1] at the input size (see the module doc).

    The attention probabilities are recomputed from each block's ``attn.qkv`` output by a forward
    hook (timm's fused kernels never materialise them), during the model's own forward; the layers
    multiplied are those that see the whole token grid (TransFG's last layer sees only its parts).
    A model without a class token gets the mean over the tokens' rows (the attention each patch
    receives).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise UserError(f"unknown head fusion {head_fusion!r}; known: {', '.join(HEAD_FUSIONS)}")
    backbone = _vit_backbone(model)
    probs: list[torch.Tensor] = []

    def hook(attn: nn.Module):
        def record(module, args, out) -> None:
            b, n, _ = out.shape
            qkv = out.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probs.append(((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1))
        return record

    handles = [blk.attn.qkv.register_forward_hook(hook(blk.attn)) for blk in backbone.blocks]
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    probs = probs[:len(backbone.blocks)]  # the first pass over the image (WS-DAN/CAL run the blocks again on crops)
    n = probs[0].shape[-1]
    eye = torch.eye(n, device=probs[0].device)
    rollout = eye.expand(images.shape[0], n, n)
    for p in probs:
        if p.shape[-1] != n:  # a layer over a subset of the tokens ends the product
            break
        fused = p.mean(1) if head_fusion == "mean" else (p.amax(1) if head_fusion == "max" else p.amin(1))
        a = 0.5 * fused + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    has_cls = getattr(backbone, "cls_token", None) is not None
    row = rollout[:, 0, prefix:] if has_cls else rollout[:, prefix:, prefix:].mean(1)
    grid = getattr(backbone.patch_embed, "grid_size", None)
    h, w = grid if grid is not None and grid[0] * grid[1] == row.shape[1] else (int(row.shape[1] ** 0.5),) * 2
    maps = torch.nn.functional.interpolate(row.reshape(-1, 1, h, w), size=tuple(images.shape[-2:]), mode="bilinear",
                                           align_corners=False)[:, 0]
    lo = maps.flatten(1).amin(1).view(-1, 1, 1)
    hi = maps.flatten(1).amax(1).view(-1, 1, 1)
    return ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()


def displayable(images: torch.Tensor, data_config: dict) -> np.ndarray:
    """A normalised ``(N, 3, H, W)`` batch as ``(N, H, W, 3)`` pixels in [0, 1], un-normalised with
    the model's mean and std (what the model saw, for drawing maps over)."""
    mean = torch.tensor(data_config.get("mean", (0.5,) * 3)).view(3, 1, 1)
    std = torch.tensor(data_config.get("std", (0.5,) * 3)).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def most_confused(run: Path, pairs: int) -> list[tuple[int, int, int]]:
    """``(test index, true class, predicted class)`` of the first misclassified test image of each of
    the run's ``pairs`` most confused (true, predicted) class pairs (most images first)."""
    from fgclf.report_html import confused_pairs

    npz = np.load(Path(run) / "predictions.npz")
    return [(idx[0], t, p) for t, p, idx in confused_pairs(npz["labels"], npz["logits"].argmax(1), pairs)]


def save_grid(images: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[Sequence[str]], path: Path) -> None:
    """One row per image: the image, then each of its maps over it (``maps[j][i]``), titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fgclf.report import _save_figure

    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for i in range(rows):
        axes[i][0].imshow(images[i])
        for j, m in enumerate(maps):
            axes[i][j + 1].imshow(images[i])
            axes[i][j + 1].imshow(m[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for j in range(cols):
            axes[i][j].set_title(titles[i][j], fontsize=7)
            axes[i][j].axis("off")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


__all__ = ["CAM_METHODS", "HEAD_FUSIONS", "attention_rollout", "class_maps", "displayable", "grad_cam", "most_confused", "save_grid", "target_layer"]
