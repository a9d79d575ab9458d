"""Navigator-teacher-scrutinizer part localisation: NTS-Net.

Yang, Luo, Wang, Hu, Gao and Wang, "Learning to Navigate for Fine-grained Classification",
ECCV 2018; official code yangze0930/NTS-Net (``core/model.py``, ``core/anchors.py``, ``train.py``).

* Navigator: three conv layers on the (detached) last feature map score anchors at three scales
  (strides 32, 64, 128 at 448 px with sizes 48, 96, 192 and 2-3 scales x 3 aspect ratios each);
  hard NMS (IoU 0.25) keeps the ``top_n`` (6) best.
* The parts are cut from the zero-padded image (a quarter of the image on every side: 0 is the
  mean colour after normalisation), resized to half the image size and re-encoded by the same
  backbone (the crops carry no gradient to the image, as in the official code).
* Teacher: a part classifier on every part; the navigator is trained with the ranking loss
  ``sum_{i, j: L_j > L_i} max(0, 1 - s_i + s_j) / B`` (``s`` the parts' scores, ``L`` their teacher
  losses), so better parts score higher.
* Scrutinizer: a classifier on the image's pooled feature concatenated with its first ``cat_num``
  (4) parts' features; its logits are the prediction.
* Loss: raw CE + concatenated CE + part CE + ranking loss.

Deviations: anchor sizes, part size and padding scale with the image size (the official values
are for 448 px); the anchors are laid on the navigator's actual feature maps, so any backbone
stride works; NMS is torchvision's (it drops overlaps above 0.25, the official code at 0.25 and
above).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import PartsModel, eval_forward, unwrap_to

# the official anchor settings at 448 px: (stride multiple of the feature map's, size, scales)
LEVELS = ((1, 48, (2 ** (1 / 3), 2 ** (2 / 3))), (2, 96, (2 ** (1 / 3), 2 ** (2 / 3))),
          (4, 192, (1.0, 2 ** (1 / 3), 2 ** (2 / 3))))
RATIOS = (0.667, 1.0, 1.5)


def anchors(image_hw: tuple[int, int], map_sizes: list[tuple[int, int]], base: int = 448) -> torch.Tensor:
    """Edge anchors ``(y0, x0, y1, x1)`` in image pixels, level by level, each level ordered (scale,
    ratio, row, column) as the navigator's score maps flatten. Level ``k``'s stride is the feature
    map's times 1, 2, 4 and its centres ``stride / 2 + i stride`` (the official grid); sizes scale
    with ``image / base``."""
    scale_px = image_hw[0] / base
    base_y, base_x = image_hw[0] / map_sizes[0][0], image_hw[1] / map_sizes[0][1]  # the feature map's stride
    out = []
    for (h, w), (multiple, size, scales) in zip(map_sizes, LEVELS):
        sy, sx = base_y * multiple, base_x * multiple  # as the official code: 32, 64, 128 at 448 px
        cy = (torch.arange(h, dtype=torch.float32) + 0.5) * sy
        cx = (torch.arange(w, dtype=torch.float32) + 0.5) * sx
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        for s in scales:
            for r in RATIOS:
                ah, aw = size * scale_px * s / r ** 0.5, size * scale_px * s * r ** 0.5
                out.append(torch.stack([cy - ah / 2, cx - aw / 2, cy + ah / 2, cx + aw / 2], -1).reshape(-1, 4))
    return torch.cat(out)


def select_proposals(scores: torch.Tensor, boxes: torch.Tensor, top_n: int, iou: float = 0.25) -> torch.Tensor:
    """Indices ``(B, top_n)`` of the best anchors per image after hard NMS (torchvision's), the best
    first; if fewer survive, the last one repeats."""
    from torchvision.ops import nms

    xyxy = boxes[:, [1, 0, 3, 2]].to(scores.device)
    picked = []
    for s in scores.detach().float():
        keep = nms(xyxy, s, iou)[:top_n]
        if len(keep) < top_n:
            keep = torch.cat([keep, keep[-1:].expand(top_n - len(keep))])
        picked.append(keep)
    return torch.stack(picked)


def ranking_loss(scores: torch.Tensor, part_losses: torch.Tensor) -> torch.Tensor:
    """``sum_{i, j: L_j > L_i} max(0, 1 - s_i + s_j) / B``: a part with a lower teacher loss should
    score higher by a margin of 1 (the official ``ranking_loss``)."""
    worse = (part_losses[:, None, :] > part_losses[:, :, None]).float()  # [b, i, j]: part j is worse than i
    margins = F.relu(1 - scores[:, :, None] + scores[:, None, :])
    return (margins * worse).sum() / scores.shape[0]


class Navigator(nn.Module):
    """The official ``ProposalNet``: three convs (stride 1, 2, 2) and 1x1 scorers of 6, 6 and 9 anchors
    a location. (A module, not a ModuleDict: PEFT's modules_to_save wraps modules.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down1, self.down2 = nn.Conv2d(channels, 128, 3, 1, 1), nn.Conv2d(128, 128, 3, 2, 1)
        self.down3 = nn.Conv2d(128, 128, 3, 2, 1)
        self.tidy1, self.tidy2, self.tidy3 = nn.Conv2d(128, 6, 1), nn.Conv2d(128, 6, 1), nn.Conv2d(128, 9, 1)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Anchor scores ``(B, anchors)`` and the three score maps' sizes."""
        d1 = F.relu(self.down1(fmap))
        d2 = F.relu(self.down2(d1))
        d3 = F.relu(self.down3(d2))
        maps = [self.tidy1(d1), self.tidy2(d2), self.tidy3(d3)]
        return torch.cat([m.flatten(1) for m in maps], 1), [tuple(m.shape[-2:]) for m in maps]


def _map_and_pooled(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    fmap = backbone.forward_features(x)
    if fmap.ndim != 4:
        raise UserError("method nts_net needs a CNN whose forward_features gives a feature map")
    return [fmap, backbone.forward_head(fmap, pre_logits=True)]


class NTSModel(PartsModel):
    """Backbone, navigator, raw, part and concatenated classifiers.

    Args:
        backbone: A timm CNN (feature map and pooled features).
        num_classes: Classes.
        top_n: Parts kept after NMS (6).
        cat_num: Parts the concatenated classifier sees (4).
    """

    new_modules = ("fg_navigator", "fg_raw", "fg_partcls", "fg_head")

    def __init__(self, backbone: nn.Module, num_classes: int, *, top_n: int = 6, cat_num: int = 4) -> None:
        if not 1 <= cat_num <= top_n:
            raise UserError(f"method.cat_num must be in 1..top_n ({top_n}), got {cat_num}")
        super().__init__(backbone, num_classes, features=_map_and_pooled)
        map_channels, c = self.stage_channels
        self.top_n, self.cat_num = top_n, cat_num
        self.fg_navigator = Navigator(map_channels)
        self.num_features = c * (cat_num + 1)
        self.fg_raw = nn.Linear(c, num_classes)
        self.fg_partcls = nn.Linear(c, num_classes)
        self.fg_head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.last_boxes: torch.Tensor | None = None  # (B, top_n, 4) proposals of the latest forward

    @staticmethod
    def crop_parts(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, N, 4)`` boxes cut from the zero-padded images and resized to half the image size:
        ``(B N, 3, H / 2, W / 2)``, without gradient to the images."""
        b, _, h, w = x.shape
        pad_h, pad_w = h // 2, w // 2
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))  # 0: the mean colour of normalised images
        crops = []
        with torch.no_grad():
            for i in range(b):
                for y0, x0, y1, x1 in boxes[i].round().long().tolist():
                    y0, y1 = max(y0 + pad_h, 0), min(y1 + pad_h, h + 2 * pad_h)
                    x0, x1 = max(x0 + pad_w, 0), min(x1 + pad_w, w + 2 * pad_w)
                    crops.append(F.interpolate(padded[i:i + 1, :, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)],
                                               size=(h // 2, w // 2), mode="bilinear", align_corners=True))
        return torch.cat(crops)

    def parts(self, x: torch.Tensor) -> dict:
        """Raw, concatenated and part logits, the chosen parts' scores and the concatenated features
        (the pooled feature and its first ``cat_num`` parts' features: what the scrutinizer classifies)."""
        b, _, h, w = x.shape
        fmap, pooled = _map_and_pooled(self.backbone, x)
        scores, sizes = self.fg_navigator(fmap.detach())
        boxes = anchors((h, w), sizes).to(x.device)
        index = select_proposals(scores, boxes, self.top_n)
        chosen = boxes[index]  # (B, top_n, 4), image pixels
        self.last_boxes = chosen.detach()
        part_feats = self.backbone.forward_head(self.backbone.forward_features(self.crop_parts(x, chosen)),
                                                pre_logits=True).view(b, self.top_n, -1)
        concat = torch.cat([part_feats[:, :self.cat_num].flatten(1), pooled], 1)
        return {"raw": self.fg_raw(pooled), "logits": self.fg_head(concat), "part_logits": self.fg_partcls(part_feats),
                "part_scores": scores.gather(1, index), "features": concat}

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        """New raw, part and concatenated classifiers for ``num_classes`` (0: Identity)."""
        super().reset_classifier(num_classes, global_pool)
        c = self.stage_channels[1]
        self.fg_raw = nn.Linear(c, num_classes) if num_classes else nn.Identity()
        self.fg_partcls = nn.Linear(c, num_classes) if num_classes else nn.Identity()



@register_method
class NTSNet(Method):
    """NTS-Net: a navigator proposes parts, a teacher ranks them, a scrutinizer classifies image + parts."""

    name = "nts_net"
    options = {"top_n": 6, "cat_num": 4}
    requires = frozenset({"feature_map", "hard_labels"})
    architecture = ("cat_num",)
    paper = "Yang et al., Learning to Navigate for Fine-grained Classification, ECCV 2018"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return NTSModel(backbone, num_classes, top_n=int(self.opts["top_n"]), cat_num=int(self.opts["cat_num"]))

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        out = model(ctx.inputs(images), return_parts=True)
        b, n = out["part_logits"].shape[:2]
        part_labels = labels.repeat_interleave(n)
        part_logits = out["part_logits"].reshape(b * n, -1).float()
        with torch.no_grad():  # the teacher's loss of each part ranks the navigator's scores
            teacher = F.cross_entropy(part_logits, part_labels, reduction="none").view(b, n)
        raw, concat = self.criterion(out["raw"], labels), self.criterion(out["logits"], labels)
        partcls = self.criterion(part_logits, part_labels)
        rank = ranking_loss(out["part_scores"].float(), teacher)
        penalty, terms = self.penalty(out["logits"])
        terms.update(raw=raw.detach(), concat=concat.detach(), partcls=partcls.detach(), rank=rank.detach())
        return StepOutput(self.add_regularizer(model, raw + concat + partcls + rank + penalty), out["logits"], terms)

    def draw(self, accelerator, model: nn.Module, images: torch.Tensor, path: Path) -> None:
        """Each test image with its ``top_n`` proposals (every process runs the forward pass)."""
        net = unwrap_to(model, NTSModel)
        x, _ = eval_forward(model, images, model)
        boxes = net.last_boxes.cpu()
        if accelerator is None or accelerator.is_main_process:
            from fgclf.methods._pictures import part_grid

            rects = [[(float(y0), float(x0), float(y1 - y0), float(x1 - x0)) for y0, x0, y1, x1 in row.tolist()]
                     for row in boxes]
            part_grid(x.float().cpu(), rects, path, title=f"nts_net: the {boxes.shape[1]} proposals after NMS")
