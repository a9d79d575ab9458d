"""Transfer strategies: which parameters train, and which layers stay in eval mode."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fgclf.errors import UserError


def classifier_names(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the classifier head (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    head = cfg.get("classifier", "classifier")
    return [head] if isinstance(head, str) else list(head)


def apply_strategy(model: nn.Module, strategy: str) -> Callable[[nn.Module], None]:
    """Freeze parameters for ``strategy`` and return the function that puts the model in train mode.

    ``full`` trains everything. ``linear_probe`` trains only the classifier and keeps the
    frozen body (BatchNorm statistics, dropout) in eval mode, so the features stay exactly
    the pretrained ones.
    """
    if strategy == "full":
        return lambda m: m.train()
    if strategy != "linear_probe":
        raise UserError(f"unknown strategy '{strategy}'; known: full, linear_probe")
    heads = classifier_names(model)
    head_modules = []
    for name, module in model.named_modules():
        if name in heads:
            head_modules.append(module)
    if not head_modules:
        raise UserError(f"linear_probe: no classifier module named {heads} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in head_modules:
        for p in module.parameters():
            p.requires_grad_(True)

    def train_mode(m: nn.Module) -> None:
        m.eval()
        for module in head_modules:
            module.train()
    return train_mode
