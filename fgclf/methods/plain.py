"""``plain``: the backbone as it is, one forward pass per batch (fgclf's training step before methods)."""
from __future__ import annotations

from torch import nn

from fgclf.methods._base import Method, register_method


@register_method
class Plain(Method):
    """The timm model unchanged; the step is the base class's: mixup/cutmix, loss, logit and weight
    penalties."""

    name = "plain"
    options: dict = {}
    requires = frozenset()
    paper = ""

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return backbone
