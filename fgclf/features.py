"""Frozen-backbone features: extract once, cache as safetensors, train heads on the cache.

A linear probe through images runs the whole frozen body every epoch; the features it sees
never change (eval transform, body in eval mode), so they can be computed once. This module
holds the pieces that ``scripts/extract_features.py`` and ``scripts/train_probe.py`` share:

- :func:`extract_features`: pooled pre-logits features of every sample of a loader, by timm's
  contract (``forward_head(forward_features(x), pre_logits=True)``), sharded over processes and
  gathered in dataset order.
- :func:`save_features` / :func:`load_features` / :func:`load_feature_dir`: the cache format.
- :class:`ProbeHead`, :func:`fit_head`, :func:`fit_sklearn_head`, :func:`save_probe_head` /
  :func:`load_probe_head`: heads trained on cached features.
- :class:`ExtractConfig`, :class:`ProbeConfig`: the two scripts' configurations.

A feature directory::

    DIR/features_train.safetensors   tensors "features" (N, D) float32, "labels" (N,) int64;
    DIR/features_val.safetensors     metadata "image_ids" (JSON list, dataset order) and "meta"
    DIR/features_test.safetensors    (JSON: split, class_names, model_name, feature_dim)
    DIR/meta.json                    model, data config, class names, feature dim, command, ...

``meta.json`` is written last, so a directory without it is incomplete.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fgclf.config import ExtractConfig, ProbeConfig, ProbeTrainConfig  # noqa: F401 (config dataclasses live there)
from fgclf.errors import UserError

FORMAT = "fgclf.features/1"
PROBE_FORMAT = "fgclf.probe/1"
SPLITS = ("train", "val", "test")
META_NAME = "meta.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "config.json"


def features_path(directory: str | os.PathLike, split: str) -> Path:
    """``DIR/features_<split>.safetensors``."""
    return Path(directory) / f"features_{split}.safetensors"


# ----------------------------------------------------------------------------- configs
def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features ``(B, D)`` through timm's model contract."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise UserError(f"{type(model).__name__} does not follow timm's contract "
                        "(forward_features / forward_head); cannot extract pre-logits features")
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.no_grad()
def extract_features(accelerator, model: nn.Module, loader, *, progress: bool = False,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Pre-logits features and labels of every sample in ``loader``, gathered from all processes.

    The model is unwrapped (accelerate/DDP, ``torch.compile``, PEFT: the adapters stay
    active in the base model) and run in eval mode; its train/eval mode is restored after.
    With a loader prepared by ``accelerator`` each process computes its shard and
    ``gather_for_metrics`` returns every sample exactly once, in dataset order.

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and int64 ``(N,)`` numpy arrays
        (``(0, 0)`` features for an empty loader).
    """
    from tqdm.auto import tqdm

    from fgclf.models import unwrap_model

    body = unwrap_model(accelerator.unwrap_model(model))
    was_training = body.training
    body.eval()
    feats, labels = [], []
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False,
                                    disable=not (progress and accelerator.is_local_main_process)):
            images = images.to(accelerator.device)
            targets = torch.as_tensor(targets, device=accelerator.device)
            with accelerator.autocast():
                out = pre_logits(body, images)
            out, targets = accelerator.gather_for_metrics((out.float().contiguous(), targets))
            feats.append(out.cpu())
            labels.append(targets.cpu())
    finally:
        body.train(was_training)
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(feats).numpy().astype(np.float32), torch.cat(labels).numpy().astype(np.int64)


# ----------------------------------------------------------------------------- the cache format


@dataclass
class FeatureSet:
    """One split's cached features.

    Attributes:
        features: ``(N, D)`` float32.
        labels: ``(N,)`` int64 class ids.
        image_ids: ``N`` dataset image ids, in the order of the rows.
        meta: ``split``, ``class_names``, ``model_name``, ``feature_dim`` and anything else saved.
    """

    features: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])


def save_features(path: str | os.PathLike, features: np.ndarray, labels: np.ndarray,
                  image_ids: Sequence[Any], meta: dict) -> Path:
    """Write one split's features atomically as safetensors (ids and ``meta`` in its metadata).

    Args:
        path: Output ``.safetensors`` file.
        features: ``(N, D)`` array (stored as float32).
        labels: ``(N,)`` integer labels.
        image_ids: ``N`` ids (stored as strings).
        meta: JSON-able dict (class names, model name, split, ...).
    """
    from safetensors.torch import save

    from fgclf.utils import atomic_write_bytes

    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    ids = [str(i) for i in image_ids]
    if features.ndim != 2 or labels.shape != (features.shape[0],) or len(ids) != features.shape[0]:
        raise ValueError(f"features {features.shape}, labels {labels.shape} and {len(ids)} image ids disagree")
    tensors = {"features": torch.from_numpy(features), "labels": torch.from_numpy(labels)}
    metadata = {"format": FORMAT, "image_ids": json.dumps(ids), "meta": json.dumps(meta, default=str)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a file written by :func:`save_features`.

    Raises:
        UserError: the file is missing, unreadable, not an fgclf feature file, or inconsistent.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file not found: {path} (write it with scripts/extract_features.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read features file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if metadata.get("format") != FORMAT or not {"features", "labels"} <= set(tensors):
        raise UserError(f"{path} is not an fgclf features file (format {metadata.get('format')!r})")
    features, labels = tensors["features"].float().numpy(), tensors["labels"].long().numpy()
    ids = json.loads(metadata.get("image_ids", "[]"))
    if features.ndim != 2 or labels.shape != (features.shape[0],) or len(ids) != features.shape[0]:
        raise UserError(f"{path}: features {tuple(features.shape)}, labels {tuple(labels.shape)} and "
                        f"{len(ids)} image ids disagree")
    return FeatureSet(features, labels, ids, json.loads(metadata.get("meta", "{}")))


def load_feature_dir(directory: str | os.PathLike) -> tuple[dict[str, FeatureSet], dict]:
    """Every split of a feature directory plus its ``meta.json``, checked against each other.

    ``train`` and ``test`` must exist; ``val`` is loaded when ``meta.json`` lists it.

    Raises:
        UserError: missing directory/files, or splits whose feature dim, class names or labels
        disagree with ``meta.json``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"feature directory not found: {directory} (write it with scripts/extract_features.py)")
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise UserError(f"{meta_path} not found; is {directory} a complete feature directory?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {meta_path}: {e}") from None
    for key in ("feature_dim", "class_names", "splits"):
        if key not in meta:
            raise UserError(f"{meta_path} lacks '{key}'")
    dim, names = int(meta["feature_dim"]), list(meta["class_names"])
    sets = {}
    for split in SPLITS:
        if split in ("train", "test") or split in meta["splits"]:
            fs = load_features(features_path(directory, split))
            if len(fs) and fs.dim != dim:
                raise UserError(f"feature dim mismatch: {features_path(directory, split).name} has {fs.dim} "
                                f"columns but {META_NAME} says {dim}")
            if fs.meta.get("class_names", names) != names:
                raise UserError(f"{features_path(directory, split).name} has other class names than {META_NAME}")
            if len(fs) and (fs.labels.min() < 0 or fs.labels.max() >= len(names)):
                raise UserError(f"{features_path(directory, split).name} has labels outside 0..{len(names) - 1}")
            sets[split] = fs
    for split in ("train", "test"):
        if len(sets[split]) == 0:
            raise UserError(f"{features_path(directory, split)} holds no samples")
    return sets, meta


# ----------------------------------------------------------------------------- heads
class ProbeHead(nn.Module):
    """A head on raw pre-logits features: standardisation buffers, then linear or MLP.

    Args:
        in_dim: Feature dimension ``D``.
        num_classes: Outputs.
        kind: ``linear`` (dropout, Linear) or ``mlp`` (dropout, Linear, GELU, dropout, Linear).
        hidden_dim: Hidden width of ``mlp``.
        dropout: Dropout probability.
    """

    def __init__(self, in_dim: int, num_classes: int, *, kind: str = "linear", hidden_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes))
        else:
            raise UserError(f"unknown probe head '{kind}'; known: linear, mlp")
        self.kind, self.in_dim, self.num_classes = kind, in_dim, num_classes
        self.hidden_dim, self.dropout = hidden_dim, dropout

    def set_standardization(self, features: torch.Tensor) -> None:
        """Zero mean, unit variance per feature from ``features`` (constant features keep scale 1)."""
        std = features.std(dim=0, unbiased=False)
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def config(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "num_classes": self.num_classes,
                "hidden_dim": self.hidden_dim, "dropout": self.dropout}


@torch.no_grad()
def predict_logits(head: nn.Module, features: np.ndarray | torch.Tensor, *, batch_size: int = 4096) -> np.ndarray:
    """``head`` logits of ``features`` (eval mode, float32 numpy)."""
    head.eval()
    x = torch.as_tensor(features, dtype=torch.float32)
    device = next(head.parameters()).device
    out = [head(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, head.num_classes), dtype=np.float32)


@dataclass
class FitResult:
    """What :func:`fit_head` did: the best epoch's weights are loaded into the head."""

    best_epoch: int
    best_metric: Optional[float]
    epochs_run: int
    stopped_early: bool
    history: list[dict]


def _improved(value: float, best: Optional[float], min_delta: float, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit_head(head: ProbeHead, train: FeatureSet, val: Optional[FeatureSet], *, optimizer, scheduler, epochs: int,
             batch_size: int = 0, metric: str = "loss", patience: int = 0, min_delta: float = 0.0, seed: int = 0,
             on_epoch: Optional[Callable[[dict], None]] = None) -> FitResult:
    """Train ``head`` with cross-entropy on cached features, validating after every epoch.

    Args:
        head: The head (on the device it should train on).
        train, val: Feature sets (``val`` None: the last epoch counts as best).
        optimizer, scheduler: From :func:`fgclf.optim.create_optimizer` / ``create_scheduler``.
        epochs: Passes over ``train``.
        batch_size: Minibatch size (0: full batch, one update per epoch).
        metric, patience, min_delta: Best-epoch selection and early stopping on ``val``
            (``loss`` minimised, any :func:`fgclf.metrics.compute_metrics` key maximised).
        seed: Seed of the minibatch order.
        on_epoch: Called with each epoch's record (train loss, lr, val metrics, time).

    Returns:
        A :class:`FitResult`; the head holds the best epoch's weights.
    """
    from fgclf.metrics import compute_metrics

    device = next(head.parameters()).device
    x = torch.as_tensor(train.features, dtype=torch.float32, device=device)
    y = torch.as_tensor(train.labels, dtype=torch.long, device=device)
    bs = batch_size if 0 < batch_size < len(x) else len(x)
    gen = torch.Generator().manual_seed(seed)
    mode = "min" if metric == "loss" else "max"
    best, best_epoch, best_state, bad, history, step = None, 0, None, 0, [], 0
    stopped = False
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        head.train()
        order = torch.randperm(len(x), generator=gen).to(device) if bs < len(x) else None
        loss_sum, batches = 0.0, 0
        for i in range(0, len(x), bs):
            idx = order[i:i + bs] if order is not None else slice(None)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update()
            loss_sum, batches, step = loss_sum + loss.item(), batches + 1, step + 1
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / batches,
                  "lr": optimizer.param_groups[0]["lr"]}
        value = None
        if val is not None and len(val):
            logits = predict_logits(head, val.features)
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.labels)))
            scores = compute_metrics(logits, val.labels, num_classes=head.num_classes)
            record.update({"val/loss": val_loss, "val/num_samples": len(val),
                           **{f"val/{k}": v for k, v in scores.items()}})
            value = val_loss if metric == "loss" else scores.get(metric)
            if value is None:
                raise UserError(f"early_stopping_metric '{metric}' is not computed; use loss or one of "
                                f"{', '.join(scores)}")
        if value is None or _improved(value, best, min_delta, mode):
            best, best_epoch, bad = value, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            bad += 1
            stopped = bool(patience) and bad >= patience
        scheduler.step_epoch(record.get("val/loss" if metric == "loss" else f"val/{metric}"))
        record["epoch_time"] = time.perf_counter() - start
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if stopped:
            break
    if best_state is not None:  # None only when every validation value was NaN: keep the last weights
        head.load_state_dict(best_state)
    return FitResult(best_epoch, best, len(history), stopped, history)


def fit_sklearn_head(train: FeatureSet, num_classes: int, *, c: float = 1.0, max_iter: int = 2000,
                     standardize: bool = True) -> ProbeHead:
    """Fit scikit-learn's multinomial LogisticRegression and return it as a linear :class:`ProbeHead`.

    The head's logits are the model's ``decision_function`` (softmax of them is its
    ``predict_proba``). Classes absent from ``train`` get a constant -1e4 logit. A
    two-class problem's single score ``z`` becomes the logits ``(-z/2, z/2)``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    head = ProbeHead(train.dim, num_classes, kind="linear")
    x = torch.from_numpy(train.features)
    if standardize:
        head.set_standardization(x)
    xs = ((x - head.mean) / head.std).double().numpy()
    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through n_iter_ below
        model.fit(xs, train.labels)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, train.dim))
    bias = np.full(num_classes, -1e4)
    weight[model.classes_], bias[model.classes_] = coef, intercept
    linear = head.net[1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    head.sklearn_iterations = int(np.max(model.n_iter_))
    return head


def save_probe_head(directory: str | os.PathLike, head: ProbeHead, *, meta: dict) -> Path:
    """Write ``head.safetensors`` + ``config.json`` (head config, ``meta``: backbone, classes, ...)."""
    from safetensors.torch import save

    from fgclf.utils import atomic_write_bytes, atomic_write_json

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(directory / HEAD_WEIGHTS, save(state, metadata={"format": PROBE_FORMAT}))
    atomic_write_json(directory / HEAD_CONFIG, {**meta, "format": PROBE_FORMAT, "head": head.config()})
    return directory


def load_probe_head(directory: str | os.PathLike) -> tuple[ProbeHead, dict]:
    """Rebuild a head saved by :func:`save_probe_head`; returns ``(head in eval mode, config)``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        if not (directory / name).is_file():
            raise UserError(f"{directory / name} not found; is {directory} a probe checkpoint?")
    config = json.loads((directory / HEAD_CONFIG).read_text(encoding="utf-8"))
    if config.get("format") != PROBE_FORMAT:
        raise UserError(f"{directory} is not a probe checkpoint (format {config.get('format')!r})")
    h = config["head"]
    head = ProbeHead(h["in_dim"], h["num_classes"], kind=h["kind"], hidden_dim=h["hidden_dim"], dropout=h["dropout"])
    head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)), strict=True)
    return head.eval(), config


__all__ = [
    "ExtractConfig", "FeatureSet", "FitResult", "ProbeConfig", "ProbeHead", "ProbeTrainConfig", "extract_features",
    "features_path", "fit_head", "fit_sklearn_head", "load_feature_dir", "load_features", "load_probe_head",
    "pre_logits", "predict_logits", "save_features", "save_probe_head",
]
