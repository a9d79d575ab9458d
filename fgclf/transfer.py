"""Transfer strategies: which parameters train, and which layers stay in eval mode."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fgclf.errors import UserError
from fgclf.models._checkpoint import classifier_names, new_module_names


def _frozen_bn_eval(model: nn.Module, *, all_bn: bool) -> None:
    """BatchNorm layers without trainable parameters (or all, with ``all_bn``) to eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if all_bn or not any(p.requires_grad for p in module.parameters()):
                module.eval()


def stage_groups(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names per stage from timm's ``group_matcher``: 0 = stem, then stages, last = head."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise UserError(f"partial fine-tuning needs a timm model with stages; {type(model).__name__} has none")
    return group_parameters(model, model.group_matcher(coarse=True))


def _freeze_first_stages(model: nn.Module, n: int) -> None:
    groups = stage_groups(model)
    stages = len(groups) - 2  # without stem and head
    if not 0 <= n <= stages:
        raise UserError(f"partial:{n}: {type(model).__name__} has {stages} stages; use partial:0..{stages}")
    frozen = {name for gid, names in groups.items() if gid <= n for name in names}
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def apply_strategy(model: nn.Module, strategy: str, *, freeze_bn: bool = False) -> Callable[[nn.Module], None]:
    """Freeze parameters for ``strategy`` and return the function that puts the model in train mode.

    ``full`` trains everything. ``partial:N`` freezes the stem and the first ``N`` stages
    (timm's stage grouping, so it works for ResNet, EfficientNet, ConvNeXt and ViT blocks
    alike) and keeps their BatchNorm layers in eval mode. ``linear_probe`` trains only the
    classifier and keeps the whole body (BatchNorm statistics, dropout) in eval mode, so the
    features stay exactly the pretrained ones. ``freeze_bn`` keeps every BatchNorm's running
    statistics fixed.
    """
    if strategy == "full" or strategy.startswith("partial:"):
        if strategy != "full":
            try:
                n = int(strategy.split(":", 1)[1])
            except ValueError:
                raise UserError(f"strategy '{strategy}': expected partial:N with a whole number N") from None
            _freeze_first_stages(model, n)

        def train_mode_full(m: nn.Module) -> None:
            m.train()
            _frozen_bn_eval(m, all_bn=freeze_bn)
        return train_mode_full
    if strategy != "linear_probe":
        raise UserError(f"unknown strategy '{strategy}'; known: full, partial:N, linear_probe")
    heads = new_module_names(model)  # the classifier, and a method's own layers (pooling reduction, attention)
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


def head_is_new(model: nn.Module, *, name: str, pretrained: bool, weights: str | None, num_classes: int) -> bool:
    """Whether ``create_model`` gave ``model`` a freshly initialised classifier.

    True for pretrained timm/offline weights with another class count than theirs (1000), and
    for a weight file or ``file:`` export whose stored head is missing or of another size;
    False for random models (nothing is pretrained) and for loaded heads of the right size,
    which must keep their trained values.
    """
    from fgclf.models._checkpoint import head_size_in, read_checkpoint_config, read_weights

    if name.startswith("file:"):
        return read_checkpoint_config(name[len("file:"):])["num_classes"] != num_classes
    if name.startswith("hf:"):  # transformers says whether the repo's classifier fitted (fgclf/models/_hf.py)
        return pretrained and not getattr(model, "head_loaded", False)
    if weights is not None:
        return head_size_in(read_weights(weights), model) != num_classes
    return pretrained and num_classes != 1000


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
