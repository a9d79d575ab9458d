"""``hierarchy``: one classifier per label level on the backbone's pooled features (``--model.hierarchy true``).

Datasets with coarser labels (FGVC-Aircraft's family and manufacturer, NABirds' parent node,
Oxford-IIIT Pets' species; ``Records.levels``) give each level its own linear head on the same
pre-logits features; the loss is the fine level's plus ``level_weight`` times each coarser
level's (the run's loss function, so label smoothing, focal and mixup's soft targets, mapped
to each level, apply to every level; per-class weights, which belong to the fine classes, are
refused). This is the shared-trunk, multi-head
form of hierarchical training studied by Chang et al., "Your 'Flamingo' is My 'Bird':
Fine-Grained, or Not" (CVPR 2021), without their level-specific feature disentangling.

Inference is the fine head's logits; with ``consistent`` the fine prediction is made
consistent with the coarse heads: ``log p(fine) + sum_levels log p(level = level of fine)``,
so a class whose family the family head rules out is ruled out too.

The level maps are options (``levels``: ``{level: {"names": [...], "of": [coarse index of each
fine class]}}``), recorded with the run's checkpoints, so an export rebuilds the heads.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import MethodModel


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's own pooled pre-logits (its classifier removed) as a 1 x 1 map."""
    return [backbone.forward_head(backbone.forward_features(x))[..., None, None]]


class HierarchyModel(MethodModel):
    """A backbone with its own pooling, the fine classifier ``fg_head`` and one linear head per coarser
    level (``fg_levels``: one Linear whose outputs are the levels' logits side by side, which PEFT's
    ``modules_to_save`` can wrap); ``forward(x, return_levels=True)`` gives ``{"logits": fine,
    level: logits}``."""

    new_modules = ("fg_levels", "fg_head")

    def __init__(self, backbone: nn.Module, num_classes: int, levels: dict[str, dict], consistent: bool = False) -> None:
        super().__init__(backbone, num_classes, features=pooled_features)
        self.num_features = self.channels
        self.reset_classifier(num_classes)
        self.consistent = consistent
        self.level_names = list(levels)
        self.level_sizes = [len(spec["names"]) for spec in levels.values()]
        self.fg_levels = nn.Linear(self.channels, sum(self.level_sizes))
        for name, spec in levels.items():  # derived from the options: not part of the weights
            self.register_buffer(f"level_of_{name}", torch.tensor(spec["of"], dtype=torch.long), persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.backbone.forward_head(x)
        return pooled if pre_logits else self.fg_head(pooled)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new fine classifier; only for the classes the level maps describe (0: features only)."""
        expected = len(getattr(self, "level_of_" + self.level_names[0])) if hasattr(self, "level_names") else None
        if num_classes and expected is not None and num_classes != expected:
            raise UserError(f"a hierarchy model's level heads belong to its {expected} classes; it cannot be "
                            f"fine-tuned on {num_classes} (start from its plain backbone instead)")
        super().reset_classifier(num_classes, global_pool)

    def level_of(self, name: str) -> torch.Tensor:
        return getattr(self, f"level_of_{name}")

    def forward(self, x: torch.Tensor, return_levels: bool = False):
        pooled = self.forward_head(self.forward_features(x), pre_logits=True)
        out = {"logits": self.fg_head(pooled)}
        out.update(zip(self.level_names, self.fg_levels(pooled).split(self.level_sizes, dim=-1)))
        if return_levels:
            return out
        if not self.consistent:
            return out["logits"]
        joint = F.log_softmax(out["logits"].float(), dim=-1)
        for name in self.level_names:
            joint = joint + F.log_softmax(out[name].float(), dim=-1)[:, self.level_of(name)]
        return joint.to(out["logits"].dtype)


def check_levels(levels: Optional[dict], num_classes: int) -> dict[str, dict]:
    """``levels`` as the model needs it; a UserError naming what is wrong."""
    if not levels:
        raise UserError("method hierarchy is switched on by --model.hierarchy true, on a dataset with coarser label "
                        "levels (fgvc_aircraft, nabirds, oxford_pets)")
    for name, spec in levels.items():
        of, names = list(spec.get("of", [])), list(spec.get("names", []))
        if len(of) != num_classes:
            raise UserError(f"hierarchy level {name}: {len(of)} entries for {num_classes} classes")
        bad = [k for k, c in enumerate(of) if not 0 <= c < len(names)]
        if bad:
            raise UserError(f"hierarchy level {name}: class {bad[0]} has no {name} (the copy lacks its images or "
                            "annotations)")
    return levels


@register_method
class Hierarchy(Method):
    """Multi-level heads on the pooled features; the loss a weighted sum over levels."""

    name = "hierarchy"
    options = {"levels": None, "level_weight": 1.0, "consistent": False}
    architecture = ("levels",)
    requires = frozenset({"data_parallel"})
    paper = "multi-level heads (cf. Chang et al., CVPR 2021)"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        levels = check_levels(self.opts["levels"], num_classes)
        return HierarchyModel(backbone, num_classes, levels, consistent=bool(self.opts["consistent"]))

    def level_targets(self, labels: torch.Tensor, name: str) -> torch.Tensor:
        """The level's labels: each class's coarse index, or mixup's soft targets summed per coarse class."""
        spec = self.opts["levels"][name]
        of = torch.as_tensor(spec["of"], device=labels.device)
        if labels.ndim == 1:
            return of[labels]
        onehot = F.one_hot(of, len(spec["names"])).to(labels.dtype)
        return labels @ onehot

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        if self.parts.mixup is not None:
            images, labels = self.parts.mixup(images, labels)
        out = model(ctx.inputs(images), return_levels=True)
        loss = self.criterion(out["logits"], labels)
        penalty, terms = self.penalty(out["logits"])
        terms["fine"] = loss.detach()
        for name in self.opts["levels"]:
            level = self.criterion(out[name], self.level_targets(labels, name))
            terms[f"level_{name}"] = level.detach()
            loss = loss + float(self.opts["level_weight"]) * level
        return StepOutput(self.add_regularizer(model, loss + penalty), out["logits"], terms)


def levels_option(levels: dict[str, tuple[list[str], list[int]]]) -> dict[str, dict]:
    """``Records.levels`` as the method's ``levels`` option."""
    return {name: {"names": list(names), "of": [int(c) for c in of]} for name, (names, of) in levels.items()}


__all__ = ["Hierarchy", "HierarchyModel", "check_levels", "levels_option"]
