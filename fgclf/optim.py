"""Optimizers (every timm optimizer name) and learning-rate schedules.

Schedules are shapes over *epochs* (milestones, restart periods and warmup are given in
epochs whatever the stepping), combined with a linear warmup and, for ``plateau``, a scale
that drops when a validation metric stalls::

    lr(group) = optim.lr * group["lr_scale"] * warmup(updates) * shape(t) * plateau_scale

With ``step_on="update"`` the shape sees fractional epochs ``t = updates / updates_per_epoch``
(smooth); with ``step_on="epoch"`` it sees whole epochs completed. Updates count optimizer
steps, so gradient accumulation and the number of processes do not change the schedule, and
the state (counters, plateau scale) is saved with the run's checkpoints.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.registry import Registry, unknown_name_message

SCHEDULES: Registry[Callable[[float], float]] = Registry("lr schedule")


# ----------------------------------------------------------------------------- optimizers
def list_optimizers() -> list[str]:
    """Optimizer names: timm's full list (sgd, momentum, adam, adamw, lamb, lion, ...)."""
    from timm.optim import list_optimizers as timm_list

    return sorted(timm_list())


def _base_model(model: nn.Module) -> nn.Module:
    """The timm model under a PEFT wrapper (whose names all carry ``base_model.model.``), else ``model``.

    Parameter groups are built on it so that the classifier names, timm's ``group_matcher`` and
    ``no_weight_decay`` see the names they were written for; the parameters are the same objects.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head_param_ids(model: nn.Module) -> set[int]:
    from fgclf.models._checkpoint import new_module_names

    heads = set(new_module_names(model))  # the classifier and a method's new layers
    return {id(p) for name, module in model.named_modules() if name in heads for p in module.parameters()}


def _no_weight_decay(model: nn.Module) -> set[str]:
    """timm's per-model names that must not decay (a ViT's ``pos_embed``, ``cls_token``, ...)."""
    names = getattr(model, "no_weight_decay", None)
    return set(names()) if callable(names) else set()


def create_optimizer(model: nn.Module, *, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                     momentum: float = 0.9, head_lr_scale: float = 1.0,
                     layer_decay: Optional[float] = None, fused: bool = False) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the trainable parameters, in groups with an ``lr_scale``.

    Args:
        name: Any :func:`list_optimizers` name.
        lr: Base learning rate (each group trains at ``lr * lr_scale``).
        weight_decay: Weight decay; never applied to norms and biases (1-D parameters) nor to the
            names the model's ``no_weight_decay()`` lists (a ViT's position embedding and class token).
        momentum: Momentum of SGD-like optimizers.
        head_lr_scale: Multiplier for the classifier head's learning rate (e.g. 10 to train a
            new head faster than a pretrained body).
        layer_decay: Layer-wise lr decay (timm's ``param_groups_layer_decay``): block ``i`` of
            ``L`` trains at ``layer_decay ** (L - i)`` times the lr; needs a timm model.
        fused: torch's fused implementation (``fused=True``: Adam, AdamW, SGD; CPU and GPU); an
            optimizer without one is a UserError.

    A PEFT model is grouped by its base model's names, so the head scale and layer decay apply to
    the adapters and the saved head as they would to the plain model.
    """
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

    known = list_optimizers()
    if name.lower() not in known:
        raise UserError(unknown_name_message("optimizer", name, known))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    model = _base_model(model)
    skip = _no_weight_decay(model)
    if layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise UserError(f"optim.layer_decay needs a timm model with group_matcher; {type(model).__name__} has none")
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=skip)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    heads = _head_param_ids(model)
    split = []
    for group in groups:
        for is_head in (False, True):
            params = [p for p in group["params"] if p.requires_grad and (id(p) in heads) == is_head]
            if params:
                scale = group.get("lr_scale", 1.0) * (head_lr_scale if is_head else 1.0)
                split.append({**group, "params": params, "lr_scale": scale, "lr": lr * scale})
    check_fused(name, fused)
    # timm hands momentum only to the optimizers that have one
    extra = {"fused": True} if fused else {}
    optimizer = create_optimizer_v2(split, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum, **extra)
    if fused:
        if optimizer.defaults.get("fused") is not True:  # a timm mapping that took the flag and dropped it
            raise UserError(f"optim.fused: timm's {name} built {type(optimizer).__name__}, which does not run fused")
        # The fused kernels can unscale fp16 gradients and skip an overflowing step themselves; then
        # GradScaler always calls step() and accelerate, which detects a skipped step by step() not being
        # called, never sees one, so the lr schedule would count the skipped updates (accelerate issue
        # #4242). Left to GradScaler, the unscale is one more pass over the gradients and a skipped step
        # is not called: the same update, detected.
        optimizer._step_supports_amp_scaling = False
    return optimizer


FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov", "momentum")  # timm names of torch's Adam, AdamW, SGD


def check_fused(name: str, fused: bool) -> None:
    """UserError unless ``name`` has torch's fused implementation (checked before any work starts)."""
    if fused and name.lower() not in FUSED_OPTIMIZERS:
        raise UserError(f"optim.fused: {name} has no fused implementation; torch's Adam, AdamW and SGD have "
                        f"({', '.join(FUSED_OPTIMIZERS)})")


# ----------------------------------------------------------------------------- schedule shapes
@SCHEDULES.register("constant")
def _constant(**_: object) -> Callable[[float], float]:
    return lambda t: 1.0


@SCHEDULES.register("plateau")
def _plateau(**_: object) -> Callable[[float], float]:
    return lambda t: 1.0  # the drops come from the metric (Scheduler.step_epoch)


@SCHEDULES.register("cosine")
def _cosine(*, epochs: float, warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
            **_: object) -> Callable[[float], float]:
    def shape(t: float) -> float:
        span = max(epochs - warmup_epochs, 1e-12)
        progress = min(1.0, max(0.0, (t - warmup_epochs) / span))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return shape


@SCHEDULES.register("multistep")
def _multistep(*, milestones: Sequence[float] = (), gamma: float = 0.1, **_: object) -> Callable[[float], float]:
    return lambda t: gamma ** sum(t >= m for m in milestones)


@SCHEDULES.register("cosine_restarts")
def _cosine_restarts(*, restart_epochs: float = 10.0, restart_mult: float = 1.0, min_lr_ratio: float = 0.0,
                     **_: object) -> Callable[[float], float]:
    """SGDR: cosine cycles of ``restart_epochs``, each ``restart_mult`` times longer than the last."""
    def shape(t: float) -> float:
        period, start = restart_epochs, 0.0
        while t >= start + period:
            start += period
            period *= restart_mult
        progress = (t - start) / period
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return shape


def list_schedulers() -> list[str]:
    """Registered schedule names."""
    return SCHEDULES.names()


class Scheduler:
    """Sets every param group's lr from the update/epoch counters (see the module docstring).

    Call :meth:`step_update` after each optimizer update and :meth:`step_epoch` after each
    epoch's validation (with the watched metric for ``plateau``). ``state_dict`` /
    ``load_state_dict`` make it resumable (a Checkpointer saves it as JSON: ``track_states(scheduler=...)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, name: str = "cosine", epochs: int,
                 updates_per_epoch: int, step_on: str = "update", warmup_epochs: float = 0.0,
                 milestones: Sequence[float] = (), gamma: float = 0.1, restart_epochs: float = 10.0,
                 restart_mult: float = 1.0, min_lr_ratio: float = 0.0, plateau_patience: int = 2,
                 plateau_mode: str = "max", plateau_threshold: float = 1e-4) -> None:
        if step_on not in ("update", "epoch"):
            raise UserError(f"optim.step_on must be 'update' or 'epoch', got '{step_on}'")
        self.name = name
        self.shape = SCHEDULES.get(name)(epochs=epochs, warmup_epochs=warmup_epochs, milestones=milestones,
                                         gamma=gamma, restart_epochs=restart_epochs, restart_mult=restart_mult,
                                         min_lr_ratio=min_lr_ratio)
        self.optimizer = optimizer
        self.step_on, self.updates_per_epoch = step_on, max(1, updates_per_epoch)
        self.warmup_updates = int(round(warmup_epochs * self.updates_per_epoch))
        self.gamma, self.patience, self.mode, self.threshold = gamma, plateau_patience, plateau_mode, plateau_threshold
        self.base_lrs = [g["lr"] / g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        self.updates, self.epochs, self.plateau_scale, self.best, self.bad_epochs = 0, 0, 1.0, None, 0
        self._apply()

    def factor(self) -> float:
        """The current multiplier of the base learning rate."""
        warm = min(1.0, (self.updates + 1) / self.warmup_updates) if self.updates < self.warmup_updates else 1.0
        t = self.updates / self.updates_per_epoch if self.step_on == "update" else float(self.epochs)
        return warm * self.shape(t) * self.plateau_scale

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * group.get("lr_scale", 1.0) * f

    def step_update(self) -> None:
        """After an optimizer update."""
        self.updates += 1
        self._apply()

    def step_epoch(self, metric: Optional[float] = None) -> None:
        """After an epoch (and its validation, whose ``metric`` drives ``plateau``)."""
        self.epochs += 1
        if self.name == "plateau":
            if metric is None or math.isnan(metric):
                raise UserError("the plateau lr schedule needs a validation metric every epoch")
            better = (self.best is None or (metric > self.best * (1 + self.threshold) if self.mode == "max"
                                            else metric < self.best * (1 - self.threshold)))
            if better:
                self.best, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience:
                    self.plateau_scale *= self.gamma
                    self.bad_epochs = 0
        self._apply()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("updates", "epochs", "plateau_scale", "best", "bad_epochs")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


def create_scheduler(optimizer: torch.optim.Optimizer, *, name: str = "cosine", epochs: int,
                     updates_per_epoch: int, **kwargs) -> Scheduler:
    """A :class:`Scheduler` (unknown names raise a UserError listing the valid ones)."""
    return Scheduler(optimizer, name=name, epochs=epochs, updates_per_epoch=updates_per_epoch, **kwargs)
