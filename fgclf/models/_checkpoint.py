"""fgclf's model export format and weight-file loading.

An export directory (what ``file:DIR`` reads and :func:`save_pretrained` writes)::

    DIR/config.json        {"model_name": "tf_efficientnet_lite0.pypi_in1k", "num_classes": 7,
                            "class_names": [...], "model_kwargs": {...}, "format": "fgclf.model/1"}
    DIR/model.safetensors  the full state dict (a PEFT model is merged into plain weights first)

``model_name`` is always a name :func:`fgclf.models.create_model` can build without weights
(a timm name or an offline name), so an export can be reloaded anywhere.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.utils import atomic_write_bytes, atomic_write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fgclf.model/1"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``DIR/config.json`` of an export directory.

    Raises:
        UserError: the folder, its config or its weights are missing, or the config lacks a key.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}")
    if not config_path.is_file():
        raise UserError(f"{config_path} not found; is {directory} an fgclf export (save_pretrained)?")
    if not (directory / WEIGHTS_NAME).is_file():
        raise UserError(f"{directory / WEIGHTS_NAME} not found")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from None
    missing = [k for k in ("model_name", "num_classes") if k not in config]
    if missing:
        raise UserError(f"{config_path} lacks {', '.join(missing)}")
    config.setdefault("class_names", None)
    config.setdefault("model_kwargs", {})
    return config


def base_model_name(model_name: str) -> str:
    """Follow ``file:DIR`` names to the buildable name stored in the export's config."""
    seen = set()
    while model_name.startswith("file:"):
        if model_name in seen:
            raise UserError(f"model directories refer to each other in a loop: {model_name}")
        seen.add(model_name)
        model_name = read_checkpoint_config(model_name[len("file:"):])["model_name"]
    return model_name


def _plain_module(model: nn.Module) -> nn.Module:
    """A PEFT model merged into a plain copy of its base model; any other model unchanged."""
    peft = sys.modules.get("peft")  # a PeftModel implies peft is imported; importing it costs ~3 s
    if peft is not None and isinstance(model, peft.PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, model_name: str, num_classes: int,
                    class_names: Iterable[str] | None, model_kwargs: dict[str, Any] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as an fgclf export directory readable with ``create_model("file:DIR")``.

    Args:
        model: the model (a PEFT model is merged into plain weights; the original is untouched).
        directory: output folder (created; existing files are replaced atomically).
        model_name: the name the model was built from (``file:DIR`` is resolved to its base name).
        num_classes: classifier size.
        class_names: one name per class, or None.
        model_kwargs: extra ``create_model`` keyword arguments needed to rebuild it
            (e.g. ``{"drop_path_rate": 0.1}``); must be JSON-serialisable.
        state_dict: the weights to write instead of ``model.state_dict()`` (e.g. gathered from
            a sharded DeepSpeed/FSDP model); ignored for PEFT models, which are merged.
        extra: more JSON keys for ``config.json`` (training facts; never read back).

    Returns:
        The directory path.
    """
    from safetensors.torch import save

    class_names = list(class_names) if class_names is not None else None
    if class_names is not None and len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names for {num_classes} classes")
    directory = Path(directory)
    plain = _plain_module(model)
    if state_dict is None or plain is not model:
        state_dict = plain.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    config = {**(extra or {}), "format": FORMAT, "model_name": base_model_name(model_name),
              "num_classes": int(num_classes), "class_names": class_names, "model_kwargs": dict(model_kwargs or {})}
    json.dumps(config)  # fail before writing anything if kwargs are not JSON
    atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": FORMAT}))
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or, with ``torch.load(weights_only=True)``, ``.pth/.pt/.bin``.

    Nested ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints and ``module.`` prefixes are
    unwrapped (timm's ``load_state_dict``).
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise UserError(f"weights file {path} should end with one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as e:  # corrupt file, pickled code refused by weights_only, ...
        raise UserError(f"cannot read weights {path}: {type(e).__name__}: {str(e)[:200]}") from None


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier(s) from the timm pretrained config (``classifier`` key)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def new_module_names(model: nn.Module) -> list[str]:
    """The layers a model adds to its pretrained body: the classifier, plus a fine-grained method's own
    layers (``new_modules`` of :class:`fgclf.methods.MethodModel`: pooling reductions, attention).

    They are what ``linear_probe`` trains, what PEFT keeps fully trainable and what
    ``optim.head_lr_scale`` speeds up."""
    declared = getattr(model, "new_modules", None)
    if declared:
        names = dict(model.named_modules())
        return [n for n in declared if n in names]
    return classifier_names(model)


def head_size_in(state_dict: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of classes of the classifier stored in ``state_dict`` (None if it holds no head)."""
    for name in classifier_names(model):
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` strictly, except that a head absent from it may stay freshly initialised.

    Raises:
        UserError: keys are missing (other than the classifier), unexpected, or have other shapes.
    """
    has_head = head_size_in(state_dict, model) is not None
    head_prefixes = tuple(f"{n}." for n in classifier_names(model))
    try:
        result = model.load_state_dict(state_dict, strict=has_head)
    except RuntimeError as e:
        raise UserError(f"weights {source} do not fit the model: {str(e)[:300]}") from None
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    if missing or result.unexpected_keys:
        raise UserError(f"weights {source} do not fit the model: missing {missing[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")
