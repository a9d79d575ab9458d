"""Transfer strategies: which parameters train, and which layers stay in eval mode."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fgclf.errors import UserError
from fgclf.models._checkpoint import classifier_names


def _bn_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def apply_strategy(model: nn.Module, strategy: str, *, freeze_bn: bool = False) -> Callable[[nn.Module], None]:
    """Freeze parameters for ``strategy`` and return the function that puts the model in train mode.

    ``full`` trains everything. ``linear_probe`` trains only the classifier and keeps the
    frozen body (BatchNorm statistics, dropout) in eval mode, so the features stay exactly
    the pretrained ones. ``freeze_bn`` keeps every BatchNorm's running statistics fixed
    (its affine parameters still train under ``full``).
    """
    if strategy == "full":
        def train_full(m: nn.Module) -> None:
            m.train()
            if freeze_bn:
                _bn_eval(m)
        return train_full
    if strategy != "linear_probe":
        raise UserError(f"unknown strategy '{strategy}'; known: full, linear_probe")
    heads = classifier_names(model)
    head_modules = [module for name, module in model.named_modules() if name in heads]
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


def init_head(model: nn.Module, how: str = "zero") -> None:
    """Re-initialise the classifier of a pretrained body.

    ``zero`` (BiT's recipe) starts every class at the same logit, so the first updates do not
    fight large random logits from a fresh head (timm's default head init on EfficientNet
    gives initial losses well above log(C)); ``default`` keeps the model's own init.
    """
    if how == "default":
        return
    if how != "zero":
        raise UserError(f"unknown head init '{how}'; known: zero, default")
    for name, module in model.named_modules():
        if name in classifier_names(model):
            for p in module.parameters():
                nn.init.zeros_(p)
