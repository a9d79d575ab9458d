"""Parameter-efficient fine-tuning of timm models with Hugging Face ``peft``.

``apply_peft(model, method="lora")`` freezes the backbone, adds adapters to the modules named by
``target_modules`` (default: :func:`default_target_modules`, chosen per model family) and keeps
the classifier fully trainable (``modules_to_save``). Methods come from a registry
(``list_peft_methods()``): ``lora``, ``dora`` (LoRA with weight decomposition), ``loha`` and
``lokr`` (LyCORIS Hadamard / Kronecker products) and ``ia3``. After wrapping, one eval forward
pass on a dummy image checks that every adapter runs (a parent that reads ``.weight`` directly,
as torchvision's Swin attention does, would silently bypass it).

Target names follow peft's rule: a name matches a module whose full name equals it or ends with
``"." + name`` (so ``"attn.qkv"`` matches ``blocks.3.attn.qkv``).
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from fgclf.errors import UserError
from fgclf.models._checkpoint import new_module_names
from fgclf.registry import Registry

PEFT_METHODS: Registry = Registry("peft method")
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@PEFT_METHODS.register("lora")
def _lora_config(targets: list[str], save: list[str], r: int, alpha: int, dropout: float):
    import peft

    return peft.LoraConfig(target_modules=targets, modules_to_save=save, r=r, lora_alpha=alpha,
                           lora_dropout=dropout)


@PEFT_METHODS.register("dora")
def _dora_config(targets: list[str], save: list[str], r: int, alpha: int, dropout: float):
    import peft

    return peft.LoraConfig(target_modules=targets, modules_to_save=save, r=r, lora_alpha=alpha,
                           lora_dropout=dropout, use_dora=True)


@PEFT_METHODS.register("loha")
def _loha_config(targets: list[str], save: list[str], r: int, alpha: int, dropout: float):
    import peft

    # LyCORIS low-rank Hadamard product; dropout applies to the adapter's rank dimension
    return peft.LoHaConfig(target_modules=targets, modules_to_save=save, r=r, alpha=alpha, rank_dropout=dropout)


@PEFT_METHODS.register("lokr")
def _lokr_config(targets: list[str], save: list[str], r: int, alpha: int, dropout: float):
    import peft

    # LyCORIS low-rank Kronecker product
    return peft.LoKrConfig(target_modules=targets, modules_to_save=save, r=r, alpha=alpha, rank_dropout=dropout)


@PEFT_METHODS.register("ia3")
def _ia3_config(targets: list[str], save: list[str], r: int, alpha: int, dropout: float):
    import peft

    # r/alpha/dropout do not apply: IA3 learns one scale per output channel of each target.
    return peft.IA3Config(target_modules=targets, feedforward_modules=[], modules_to_save=save)


def list_peft_methods() -> list[str]:
    """Names accepted by ``apply_peft(method=...)``."""
    return PEFT_METHODS.names()


def _matches(module_name: str, target: str) -> bool:
    """peft's list-target rule: equal, or ending with ``.target``."""
    return module_name == target or module_name.endswith("." + target)


def _adaptable_names(model: nn.Module) -> list[str]:
    """Names of modules peft can adapt (Linear / Conv), excluding the classifier and a method's new layers."""
    heads = new_module_names(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, _ADAPTABLE) and not any(_matches(n, h) or n.startswith(h + ".") for h in heads)]


def _present(names: list[str], targets: tuple[str, ...]) -> list[str]:
    """The ``targets`` that match at least one of ``names``, in ``targets`` order."""
    return [t for t in targets if any(_matches(n, t) for n in names)]


def _vit_targets(names: list[str]) -> list[str]:
    # dotted names keep ViT's patch_embed.proj (a conv on the raw image) out of the adapters
    return _present(names, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")) if _present(names, ("attn.qkv",)) else []


def _hf_attention_targets(names: list[str]) -> list[str]:
    # transformers' ViT/DINOv2/Swin/CLIP attention (q_proj, v_proj since transformers 5; PEFT's image
    # classification guide adapts the query and value projections); add fc1/fc2 through target_modules
    return _present(names, ("q_proj", "v_proj")) if len(_present(names, ("q_proj", "v_proj"))) == 2 else []


def _pointwise_targets(names: list[str]) -> list[str]:
    return _present(names, ("conv_pw", "conv_pwl"))  # EfficientNet / MobileNet 1x1 convs


def _mlp_targets(names: list[str]) -> list[str]:
    return _present(names, ("mlp.fc1", "mlp.fc2"))  # ConvNeXt and other MLP blocks


def _resnet_targets(names: list[str]) -> list[str]:
    # full names: a bare "conv1" would also catch the stem conv
    return [n for n in names if re.fullmatch(r"(?:.+\.)?layer\d+\.\d+\.conv\d+", n)]  # timm or tv: body.layer1...


def _linear_fallback(model: nn.Module, names: list[str]) -> list[str]:
    # nn.MultiheadAttention reads out_proj.weight directly: an adapter there would never run
    inside_mha = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in inside_mha}
    return [n for n in names if n in linear]


def _pointwise_fallback(model: nn.Module, names: list[str]) -> list[str]:
    # 1x1 convolutions (expansion/projection of MBConv blocks in torchvision's EfficientNet/MobileNet)
    pointwise = {n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1}
    return [n for n in names if n in pointwise]


# Tried in order; the first family that yields targets wins.
_FAMILIES: tuple[Callable[[list[str]], list[str]], ...] = (
    _vit_targets, _hf_attention_targets, _pointwise_targets, _mlp_targets, _resnet_targets)


def default_target_modules(model: nn.Module) -> list[str]:
    """Adapter targets for ``model``'s family.

    ViT-like (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), transformers' ViT/DINOv2/Swin/CLIP
    (``q_proj``, ``v_proj``: PEFT's image-classification guide), EfficientNet/MobileNet
    (``conv_pw``, ``conv_pwl``), ConvNeXt (``mlp.fc1``, ``mlp.fc2``), ResNet (the convs inside
    ``layerN`` blocks, by full name), otherwise the longer list of: every ``nn.Linear`` except the
    classifier (and ``nn.MultiheadAttention.out_proj``, which that module bypasses), or every 1x1
    convolution (torchvision's MobileNet/EfficientNet blocks).

    Raises:
        UserError: nothing adaptable was found.
    """
    from fgclf.models._factory import unwrap_model

    model = unwrap_model(model)
    names = _adaptable_names(model)
    for family in _FAMILIES:
        targets = family(names)
        if targets:
            return targets
    targets = max(_linear_fallback(model, names), _pointwise_fallback(model, names), key=len)  # tie: Linear
    if not targets:
        raise UserError(f"no default PEFT targets for {type(model).__name__}; pass target_modules")
    return targets


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """UserError for any target that matches no adaptable module, naming some that exist."""
    names = _adaptable_names(model)
    bad = [t for t in targets if not any(_matches(n, t) for n in names)]
    if bad:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(f"PEFT target modules {bad} match no Linear/Conv layer of {type(model).__name__}; "
                        f"layer names here include: {', '.join(leaves[:12])}")


def _has_parameters(model: nn.Module, name: str) -> bool:
    """True if submodule ``name`` exists and has parameters (a num_classes=0 head is an Identity)."""
    try:
        return any(p.numel() for p in model.get_submodule(name).parameters())
    except AttributeError:
        return False


def apply_peft(model: nn.Module, *, method: str = "lora", r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | None = None) -> nn.Module:
    """Wrap ``model`` in a peft model: frozen backbone, adapters on ``target_modules``, trainable head.

    Args:
        model: a timm model (its ``pretrained_cfg["classifier"]`` names the head to keep trainable).
        method: a name from :func:`list_peft_methods`.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: peft target names; None uses :func:`default_target_modules`.

    Returns:
        A ``peft.PeftModel``; ``model(x)`` still returns logits and timm attributes
        (``pretrained_cfg``, ``forward_features``) are reachable through it.
    """
    import peft

    make_config = PEFT_METHODS.get(method)
    if r < 1:
        raise UserError(f"PEFT rank r must be >= 1, got {r}")
    targets = list(target_modules) if target_modules is not None else default_target_modules(model)
    if not targets:
        raise UserError("target_modules is empty")
    _check_targets(model, targets)
    save = [h for h in new_module_names(model) if _has_parameters(model, h)]  # trained fully, saved with the adapter
    config = make_config(targets, save, r, alpha, dropout)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # peft's message for unsupported layers / bad combinations
        raise UserError(f"cannot apply {method} to {type(model).__name__}: {str(e)[:300]}") from None
    _check_saved_modules(wrapped, save)
    _check_adapters_run(wrapped, method)
    return wrapped


def _check_saved_modules(model: nn.Module, save: list[str]) -> None:
    """UserError when peft's suffix match made more layers fully trainable than the head (and a
    method's layers): e.g. a head called ``fc`` would also catch a block's ``se.fc``."""
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    wrapped = sorted(n for n, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper))
    extra = [n for n in wrapped if n not in save]
    if extra:
        raise UserError(f"PEFT would train {', '.join(extra[:3])} fully as well: its name ends like the head's "
                        f"({', '.join(save)}); rename the head or choose target_modules")


def _check_adapters_run(model: nn.Module, method: str) -> None:
    """UserError when an adapted layer's forward never runs in a forward pass of the model."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    patch_embed = getattr(model, "patch_embed", None)  # a ViT built with another img_size
    if size and getattr(patch_embed, "img_size", None) is not None:
        size = (size[0], *patch_embed.img_size)
    if not size:
        return  # no known input size: nothing to probe with
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    seen: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.add(name)) for name, m in layers.items()]
    was_training = model.training
    try:
        param = next(model.parameters())
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *size, dtype=param.dtype, device=param.device))
    except Exception:  # noqa: BLE001 - the probe is a safety net; a model it cannot feed is not an error
        return
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    unused = sorted(set(layers) - seen)
    if unused:
        raise UserError(f"{method} adapters on {len(unused)} module(s) never run in the model's forward pass (its code "
                        f"reads their weights directly), e.g. {', '.join(unused[:3])}; choose other target_modules")
