"""Attentive pairwise interaction: API-Net.

Zhuang, Wang and Qiao, "Learning Attentive Pairwise Interaction for Fine-Grained Classification",
AAAI 2020; official code PeiqinZhuang/API-Net (``models.py``, ``train.py``, ``datasets.py``).

Training batches are P classes x K images (:class:`fgclf.data.samplers.ClassBalancedBatchSampler`).
Each image's pooled feature ``x_i`` is paired with its nearest neighbour of the same class and its
nearest neighbour of another class (Euclidean distance; the image itself excluded). For a pair
``(x_1, x_2)`` the mutual vector ``x_m = W_2 drop(W_1 [x_1, x_2])`` gates both: ``g_k = sigmoid(x_m * x_k)``,
``x_1^self = x_1 + g_1 * x_1``, ``x_1^other = x_1 + g_2 * x_1`` (and symmetrically for ``x_2``). The
classifier sees the four, with dropout; the loss is their cross-entropy plus a score-ranking loss
(margin 0.05) that asks each image's true-class probability to be higher with its own gate than with
its partner's. Inference is the plain classifier on ``x_i``.

Deviations: partners are chosen in the whole global batch (every process gathers the others'
features, differentiably), so N processes train as one; the official code, on one process, also
pairs within the whole batch. Its first 8 epochs step only the new layers (the backbone's optimizer
waits); here everything trains from the start (combine with ``optim.head_lr_scale`` instead).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import MethodModel


def _pooled(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


def select_partners(features: torch.Tensor, labels: torch.Tensor, all_features: torch.Tensor,
                    all_labels: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row ``i`` of ``features`` (row ``offset + i`` of ``all_features``), the index in
    ``all_features`` of its nearest same-class and nearest other-class neighbour (Euclidean; itself
    excluded). A class with a single image in the batch pairs it with itself."""
    with torch.no_grad():
        dist = torch.cdist(features.float(), all_features.float())
        same = labels[:, None] == all_labels[None, :]
        own = torch.zeros_like(same)
        own[torch.arange(len(labels)), offset + torch.arange(len(labels), device=labels.device)] = True
        intra = dist.masked_fill(~same | own, float("inf")).argmin(1)
        lonely = ~(same & ~own).any(1)  # no other image of the class: the image itself (the official code's argmin of inf)
        intra = torch.where(lonely, offset + torch.arange(len(labels), device=labels.device), intra)
        inter = dist.masked_fill(same, float("inf")).argmin(1)
    return intra, inter


class APINetModel(MethodModel):
    """Pooled backbone features, the mutual-vector MLP and a linear classifier."""

    new_modules = ("fg_map1", "fg_map2", "fg_head")

    def __init__(self, backbone: nn.Module, num_classes: int, *, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__(backbone, num_classes, features=lambda b, x: [_pooled(b, x)])
        d = self.channels
        self.num_features = d
        self.fg_map1 = nn.Linear(2 * d, hidden)
        self.fg_map2 = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)
        self.fg_head = nn.Linear(d, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.forward_head(x, pre_logits=True)
        return pooled if pre_logits else self.fg_head(pooled)

    def interact(self, x1: torch.Tensor, x2: torch.Tensor) -> list[torch.Tensor]:
        """Logits of ``x1_self, x1_other, x2_self, x2_other`` for pairs ``(x1, x2)``."""
        mutual = self.fg_map2(self.drop(self.fg_map1(torch.cat([x1, x2], dim=1))))
        g1, g2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
        views = (x1 + g1 * x1, x1 + g2 * x1, x2 + g2 * x2, x2 + g1 * x2)
        return [self.fg_head(self.drop(v)) for v in views]

    def forward(self, x: torch.Tensor, return_parts: bool = False, pairs=None):
        """Logits; with ``return_parts`` a dict with the pooled ``features`` and, given ``pairs`` (a
        function ``features -> (x1, x2)``), the four ``interaction`` logits of those pairs (every
        parameter is used inside this forward, as DDP and DeepSpeed expect)."""
        pooled = self.forward_head(self.forward_features(x), pre_logits=True)
        logits = self.fg_head(pooled)
        if not return_parts:
            return logits
        out = {"logits": logits, "features": pooled}
        if pairs is not None:
            out["interaction"] = self.interact(*pairs(pooled))
        return out


@register_method
class APINet(Method):
    """API-Net: pairs of nearest same-class / other-class images interact through a mutual vector."""

    name = "api_net"
    options = {"samples_per_class": 4, "hidden": 512, "dropout": 0.5, "rank_margin": 0.05}
    requires = frozenset({"pk_batches", "hard_labels"})
    architecture = ("hidden",)
    paper = "Zhuang et al., Learning Attentive Pairwise Interaction for Fine-Grained Classification, AAAI 2020"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return APINetModel(backbone, num_classes, hidden=int(self.opts["hidden"]), dropout=float(self.opts["dropout"]))

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        chosen = {}

        def pairs(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(x1, x2): each image with its intra-class partner, then with its inter-class partner."""
            if ctx.num_processes > 1:  # partners from the whole global batch
                import torch.distributed as dist
                import torch.distributed.nn.functional as dist_fn

                all_feats = torch.cat(dist_fn.all_gather(feats), dim=0)
                gathered = [torch.empty_like(labels) for _ in range(ctx.num_processes)]
                dist.all_gather(gathered, labels)
                all_labels, offset = torch.cat(gathered), ctx.process_index * len(labels)
            else:
                all_feats, all_labels, offset = feats, labels, 0
            if len(torch.unique(all_labels)) < 2:
                raise UserError("api_net needs at least 2 classes in every batch (P x K batches)")
            intra, inter = select_partners(feats, labels, all_feats, all_labels, offset)
            chosen["labels2"] = torch.cat([all_labels[intra], all_labels[inter]])
            return torch.cat([feats, feats]), torch.cat([all_feats[intra], all_feats[inter]])

        out = model(ctx.inputs(images), return_parts=True, pairs=pairs)
        l1_self, l1_other, l2_self, l2_other = out["interaction"]
        targets = torch.cat([labels, labels, chosen["labels2"]])  # x1 rows, then x2 rows
        self_logits, other_logits = torch.cat([l1_self, l2_self]), torch.cat([l1_other, l2_other])
        ce = self.criterion(torch.cat([self_logits, other_logits]), torch.cat([targets, targets]))
        penalty, terms = self.penalty(out["logits"])  # on the prediction: the plain classifier's logits
        p_self = torch.softmax(self_logits.float(), 1).gather(1, targets[:, None])[:, 0]
        p_other = torch.softmax(other_logits.float(), 1).gather(1, targets[:, None])[:, 0]
        rank = F.margin_ranking_loss(p_self, p_other, torch.ones_like(p_self), margin=self.opts["rank_margin"])
        terms.update(ce=ce.detach(), rank=rank.detach())
        return StepOutput(self.add_regularizer(model, ce + rank + penalty), out["logits"], terms)
