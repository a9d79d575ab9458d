"""Optimizers (every timm optimizer name) and per-update learning-rate schedules."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.registry import Registry, unknown_name_message

SCHEDULES: Registry[Callable[[int], float]] = Registry("lr schedule")


def list_optimizers() -> list[str]:
    """Optimizer names: timm's full list (sgd, momentum, adam, adamw, lamb, lion, ...)."""
    from timm.optim import list_optimizers as timm_list

    return sorted(timm_list())


def create_optimizer(model: nn.Module, *, name: str = "adamw", lr: float = 1e-3,
                     weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the trainable parameters.

    Norm and bias parameters get no weight decay (timm's ``filter_bias_and_bn``).
    """
    from timm.optim import create_optimizer_v2

    known = list_optimizers()
    if name.lower() not in known:
        raise UserError(unknown_name_message("optimizer", name, known))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    kwargs = {"momentum": momentum} if name.lower() in ("sgd", "nesterov", "momentum", "sgdp", "lars") else {}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


@SCHEDULES.register("constant")
def _constant(*, total_steps: int, **_: object) -> Callable[[int], float]:
    return lambda step: 1.0


@SCHEDULES.register("cosine")
def _cosine(*, total_steps: int, warmup_steps: int = 0, **_: object) -> Callable[[int], float]:
    def factor(step: int) -> float:
        decay = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / decay))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@SCHEDULES.register("multistep")
def _multistep(*, milestones: Sequence[int] = (), gamma: float = 0.1, **_: object) -> Callable[[int], float]:
    return lambda step: gamma ** sum(step >= m for m in milestones)


def list_schedulers() -> list[str]:
    """Registered schedule names."""
    return SCHEDULES.names()


def create_scheduler(optimizer: torch.optim.Optimizer, *, name: str = "cosine", total_steps: int,
                     warmup_steps: int = 0, milestones: Sequence[int] = (),
                     gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer update.

    Args:
        total_steps: Optimizer updates in the whole run.
        warmup_steps: Linear warmup from ~0 to the peak lr over this many updates.
        milestones: Update counts at which ``multistep`` multiplies the lr by ``gamma``.
    """
    shape = SCHEDULES.get(name)(total_steps=total_steps, warmup_steps=warmup_steps,
                                milestones=milestones, gamma=gamma)

    def factor(step: int) -> float:
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        return warm * shape(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
