"""Exponential moving average of the model's weights (``--train.ema_decay``), through timm's
``ModelEmaV3``.

The average is updated after every optimizer update (not every micro-batch) with timm's decay
schedule: with ``warmup`` the decay at update ``t`` is ``min(decay, 1 - (1 + (t - 1)) ** (-2/3))``
(the first update copies the weights), so a short fine-grained run is not dominated by the
pretrained starting point; without it the decay is ``decay`` from the second update on.
Floating-point parameters and buffers (BatchNorm statistics) are averaged, in float32 even
when the model's weights are half precision (DeepSpeed; the average is validated on float32
inputs). The weights every process averages are the same after every update; BatchNorm
statistics are not (without ``--train.sync_bn`` each process updates its own from its share of
the batch), so before the average is validated or saved every process takes process 0's
(:meth:`ModelEma.sync`), as DDP does with the model's buffers. Its creation copies the model
once (peak memory), then the frozen parameters are shared again (below).
Frozen parameters (PEFT's base, a linear probe's body) are not copied: the average shares them
with the model (their average is themselves), so it costs the trainable part only, and ``last/``
holds the average of the trainable parameters and the buffers. The average's weights are saved
in ``last/`` (exact resume) and, when the validation prefers them, as ``best``.
"""
from __future__ import annotations

import torch
from torch import nn


class ModelEma:
    """The moving average of ``model`` (the unwrapped, prepared model: on its device).

    Attributes:
        module: The averaged copy (eval mode), a model like ``model``.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        from timm.utils import ModelEmaV3

        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, dtype=torch.float32)
        self.shared = set()
        for name, param in frozen.items():  # shared, not copied (lerp of a tensor with itself leaves it)
            if param.dtype == torch.float32:
                parent, _, leaf = name.rpartition(".")
                self._ema.module.get_submodule(parent)._parameters[leaf] = param
                self.shared.add(name)
        for p in self._ema.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    def decay_at(self, step: int) -> float:
        """The decay applied at optimizer update ``step`` (1-based)."""
        return float(self._ema.get_decay(step))

    def update(self, model: nn.Module, step: int) -> None:
        """Average in ``model``'s weights after optimizer update ``step`` (1-based)."""
        self._ema.update(model, step=step)

    def sync(self, accelerator) -> None:
        """Every process takes process 0's averaged buffers (collective; a no-op on one process)."""
        if accelerator is None or accelerator.num_processes < 2:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for buffer in self._ema.module.buffers():
                dist.broadcast(buffer, src=0)

    def state_dict(self) -> dict:
        """The average of the trainable parameters and of the buffers (the shared frozen ones left out)."""
        return {k: v for k, v in self._ema.module.state_dict().items() if k not in self.shared}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self._ema.module.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self.shared:
            raise ValueError(f"EMA state does not fit the model: missing {sorted(set(missing) - self.shared)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")


__all__ = ["ModelEma"]
