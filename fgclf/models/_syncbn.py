"""Synchronised BatchNorm: training statistics over the global batch of all processes.

``train.batch_size`` is global, so on 8 GPUs a batch of 32 leaves BatchNorm 4 images per
process; with SyncBatchNorm every process normalises with the mean and variance of all 32, and a
run on N processes trains as one process on the whole batch would (the same losses, weights and
running statistics; tested on 2 processes).

On CUDA this is timm's ``convert_sync_batchnorm`` (torch's ``SyncBatchNorm``, which keeps timm's
fused ``BatchNormAct2d`` activations). torch's kernels are CUDA-only, so on CPU (gloo) the layers
become :class:`GlobalBatchNorm`: the same statistics from plain tensor ops and differentiable
all-reduces, whose backward sums the gradients of every process's loss exactly as torch's
``SyncBatchNorm`` backward does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (any dimension) with global-batch statistics in training (CPU processes).

    Evaluation, frozen (eval-mode) layers and single-process runs use the ordinary kernel. A
    converted timm ``BatchNormAct2d`` keeps its ``drop`` and ``act`` and applies them after.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        count = all_reduce(xf.new_tensor([xf.numel() / xf.shape[1]]))
        mean = all_reduce(xf.sum(dims)) / count  # two passes: no E[x^2] - E[x]^2 cancellation
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                n = float(count)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * n / max(n - 1.0, 1.0)).to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalise(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def _to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        for name in ("act", "drop"):  # timm's BatchNormAct2d
            if isinstance(getattr(module, name, None), nn.Module):
                setattr(out, name, getattr(module, name))
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm layer of ``model`` synchronised across processes (timm's on CUDA, else
    :class:`GlobalBatchNorm`); parameters and buffers are the same tensors, so state-dict keys,
    checkpoints and exports are unchanged."""
    if torch.device(device).type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _to_global(model)


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers in ``model`` (0: ``train.sync_bn`` has nothing to do)."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())
