"""Gradual unfreezing (``--model.unfreeze "0:head,2:stage3,4:all"``): which parameters train is a
function of the epoch, as in ULMFiT (Howard and Ruder, ACL 2018) and the fine-tuning recipes that
first fit the new head on frozen features.

Schedule entries ``EPOCH:WHAT``, from epoch 0 (0-based: the entry applies from that epoch on):

* ``head``: the classifier and a method's own new layers;
* ``stageK``: stages ``K`` and above (timm's coarse stage grouping, numbered as ``partial:N``
  counts them: ``stageK`` trains what ``--model.strategy partial:K-1`` trains) and the head;
* ``all``: every parameter.

Every parameter keeps ``requires_grad`` (so DDP registers all of them once and the optimizer
holds them from the start); a frozen one has its gradient dropped before clipping and the step,
so the optimizer leaves it and its state alone (no update, no weight decay, no moment estimates)
until its stage unfreezes. BatchNorm layers of frozen stages stay in eval mode (their running
statistics are the pretrained ones). The backward pass still runs through the frozen stages: the
schedule saves no compute. The trainable set depends only on the epoch, so resume is exact.
"""
from __future__ import annotations

import re

from torch import nn

from fgclf.errors import UserError


def parse_schedule(spec: str) -> list[tuple[int, str]]:
    """``"0:head,2:stage3,4:all"`` as ``[(0, "head"), (2, "stage3"), (4, "all")]`` (checked)."""
    entries = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        epoch, _, what = part.partition(":")
        if not epoch.strip().isdigit() or not re.fullmatch(r"head|all|stage\d+", what.strip()):
            raise UserError(f"model.unfreeze: bad entry {part!r}; expected EPOCH:head|stageK|all, "
                            "e.g. \"0:head,2:stage3,4:all\"")
        entries.append((int(epoch), what.strip()))
    if not entries or entries[0][0] != 0:
        raise UserError("model.unfreeze must start at epoch 0 (e.g. \"0:head,...\")")
    if any(b[0] <= a[0] for a, b in zip(entries, entries[1:])):
        raise UserError(f"model.unfreeze: epochs must increase ({spec})")
    return entries


def _groups(model: nn.Module) -> dict[int, list[str]]:
    """timm's coarse groups (0 stem, stages, last head) of the model or of a method's backbone."""
    from fgclf.transfer import stage_groups

    if hasattr(model, "group_matcher"):
        return stage_groups(model)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "group_matcher"):
        raise UserError(f"model.unfreeze needs a timm model with stages; {type(model).__name__} has none")
    return {gid: [f"backbone.{n}" for n in names] for gid, names in stage_groups(backbone).items()}


class GradualUnfreeze:
    """The schedule applied to ``model`` (the unwrapped model: parameter names without a DDP prefix)."""

    def __init__(self, model: nn.Module, spec: str) -> None:
        from fgclf.models._checkpoint import new_module_names

        self.schedule = parse_schedule(spec)
        self.model = model
        groups = _groups(model)
        stages = len(groups) - 2  # without stem and head
        heads = new_module_names(model)
        names = [n for n, _ in model.named_parameters()]
        head = {n for n in names if any(n == h or n.startswith(h + ".") for h in heads)}
        head |= set(groups[max(groups)])  # timm's head group (the classifier, its norm)
        self.sets: list[tuple[int, set[str]]] = []
        for epoch, what in self.schedule:
            if what == "all":
                trains = set(names)
            elif what == "head":
                trains = set(head)
            else:
                k = int(what[5:])
                if not 1 <= k <= stages:
                    raise UserError(f"model.unfreeze {what}: {type(model).__name__} has stages 1..{stages}")
                trains = head | {n for gid, group in groups.items() if k <= gid for n in group}
            self.sets.append((epoch, trains))
        self.epoch = 0

    def trainable(self, epoch: int) -> set[str]:
        """Names of the parameters that train in ``epoch`` (0-based)."""
        return next(trains for start, trains in reversed(self.sets) if epoch >= start)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def drop_frozen_grads(self) -> None:
        """Drop the gradients of the parameters frozen in this epoch (before clipping and the step)."""
        trains = self.trainable(self.epoch)
        for name, p in self.model.named_parameters():
            if name not in trains:
                p.grad = None

    def train_mode(self, base):
        """``base`` (the strategy's train mode) plus eval mode for BatchNorm layers of frozen stages."""
        def apply(m: nn.Module) -> None:
            base(m)
            trains = self.trainable(self.epoch)
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    own = [f"{name}.{n}" for n, _ in module.named_parameters()]
                    if own and not any(n in trains for n in own):
                        module.eval()
        return apply


__all__ = ["GradualUnfreeze", "parse_schedule"]
