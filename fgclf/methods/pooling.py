"""Second-order pooling heads: B-CNN, compact bilinear pooling (Tensor Sketch) and iSQRT-COV.

Each replaces the backbone's global average pooling by a second-order statistic of its last
feature map; their training step is ``plain``'s (only ``build`` differs). The pooling runs in
float32 under mixed precision (square roots and matrix iterations lose too much in bf16/fp16).

* B-CNN: Lin, RoyChowdhury and Maji, "Bilinear CNN Models for Fine-grained Visual Recognition",
  ICCV 2015 (code: https://bitbucket.org/tsungyu/bcnn, PyTorch port HaoMood/bilinear-cnn).
* Compact bilinear pooling: Gao, Beijbom, Zhang and Darrell, "Compact Bilinear Pooling",
  CVPR 2016 (code: gy20073/compact_bilinear_cnn), Tensor Sketch of Pham and Pagh 2013.
* iSQRT-COV: Li, Xie, Wang and Gao, "Towards Faster Training of Global Covariance Pooling
  Networks by Iterative Matrix Square Root Normalization", CVPR 2018 (code:
  jiangtaoxie/fast-MPN-COV, ``src/representation/MPNCOV.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, register_method
from fgclf.methods._model import MethodModel, conv_bn_relu


@contextlib.contextmanager
def float32(device: torch.device):
    """Autocast off: the pooling's inputs are cast to float32 by the caller."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


# ----------------------------------------------------------------------------- functional pieces
def bilinear_pool(x: torch.Tensor) -> torch.Tensor:
    """Average outer product of the feature vectors over locations: ``(B, C, H, W) -> (B, C, C)``,
    ``sum_l x_l x_l^T / (H W)``."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


def signed_sqrt(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """B-CNN's element-wise signed square root, as the authors' PyTorch code writes it:
    ``sqrt(relu(x) + eps) - sqrt(relu(-x) + eps)`` (``sign(x) sqrt(|x|)`` with a finite gradient at 0)."""
    return torch.sqrt(torch.relu(x) + eps) - torch.sqrt(torch.relu(-x) + eps)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Sample covariance of the feature vectors over locations: ``(B, C, H, W) -> (B, C, C)``,
    ``X I_hat X^T`` with ``I_hat = (I - 1 1^T / M) / M`` (MPN-COV's ``Covpool``)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    centred = flat - flat.mean(dim=2, keepdim=True)
    return centred @ centred.transpose(1, 2) / (h * w)


def newton_schulz_sqrt(a: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Matrix square root of SPD matrices ``(B, C, C)`` by iSQRT-COV's coupled Newton-Schulz iteration.

    Pre-normalisation divides by the trace (so the iteration converges), ``Y_0 = A / tr A``,
    ``Z_0 = I``, ``T_k = (3 I - Z_k Y_k) / 2``, ``Y_{k+1} = Y_k T_k``, ``Z_{k+1} = T_k Z_k``;
    post-compensation multiplies by ``sqrt(tr A)``. Only matrix products: fast on GPUs, and
    autograd gives the gradient (the paper derives the same backward by hand).
    """
    if iterations < 1:
        raise UserError(f"Newton-Schulz iterations must be >= 1, got {iterations}")
    c = a.shape[-1]
    eye = torch.eye(c, dtype=a.dtype, device=a.device).expand_as(a)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(a.dtype).tiny)
    y = a / trace[:, None, None]
    z = eye
    for _ in range(iterations - 1):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    y = 0.5 * y @ (3.0 * eye - z @ y)  # the last step needs only Y (the official code's YZY)
    return y * trace.sqrt()[:, None, None]


def upper_triangle(a: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of symmetric matrices, ``(B, C, C) -> (B, C (C + 1) / 2)``."""
    rows, cols = torch.triu_indices(a.shape[-1], a.shape[-1], device=a.device)
    return a[:, rows, cols]


class TensorSketch(nn.Module):
    """Compact bilinear pooling by Tensor Sketch: ``phi(x) = FFT^-1(FFT(C_1 x) * FFT(C_2 x))``, where
    each count sketch ``C_i x`` adds ``s_i[c] x[c]`` into bin ``h_i[c]`` of ``dim`` bins, so that
    ``<phi(x), phi(y)> ~ <x, y>^2`` (the bilinear kernel) in expectation. The pooled feature is the
    average of ``phi`` over locations; since the FFT is linear, the products are averaged in the
    frequency domain and one inverse FFT per image suffices.

    The hashes ``h`` and signs ``s`` are drawn once from ``seed`` and kept as buffers (exports and
    resumes use the same ones).

    Args:
        in_channels: Channels of the input vectors.
        dim: Sketch dimension (the paper's 8192).
        seed: Seed of the hashes and signs.
    """

    def __init__(self, in_channels: int, dim: int = 8192, seed: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise UserError(f"sketch dimension must be >= 1, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        for i in (1, 2):
            self.register_buffer(f"h{i}", torch.randint(dim, (in_channels,), generator=g))
            self.register_buffer(f"s{i}", torch.randint(2, (in_channels,), generator=g).float() * 2 - 1)

    def count_sketch(self, x: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(N, C) -> (N, dim)``: column ``c`` of ``x``, times ``s[c]``, added into bin ``h[c]``."""
        return x.new_zeros(x.shape[0], self.dim).index_add_(1, h, x * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, dim)``: the location average of the Tensor Sketch."""
        b, c, h, w = x.shape
        vectors = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        f1 = torch.fft.rfft(self.count_sketch(vectors, self.h1, self.s1), dim=1)
        f2 = torch.fft.rfft(self.count_sketch(vectors, self.h2, self.s2), dim=1)
        pooled = (f1 * f2).reshape(b, h * w, -1).mean(dim=1)
        return torch.fft.irfft(pooled, n=self.dim, dim=1)


# ----------------------------------------------------------------------------- models
class _SecondOrderModel(MethodModel):
    """Backbone -> optional 1x1 reduction -> second-order pooling -> normalisation -> (dropout) -> linear.

    Subclasses define :meth:`make_pool` (the pooling module for ``channels`` inputs and its output
    size) and :meth:`normalise`.
    """

    new_modules = ("fg_reduce", "fg_pool", "fg_head")

    def __init__(self, backbone: nn.Module, num_classes: int, *, reduce_dim: Optional[int], dropout: float) -> None:
        super().__init__(backbone, num_classes)
        if reduce_dim is not None and reduce_dim < 1:
            raise UserError(f"method.reduce_dim must be >= 1 (or null: no reduction), got {reduce_dim}")
        self.fg_reduce = conv_bn_relu(self.channels, reduce_dim) if reduce_dim else nn.Identity()
        self.fg_pool, self.num_features = self.make_pool(reduce_dim or self.channels)
        self.drop = nn.Dropout(dropout)
        self.fg_head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def make_pool(self, channels: int) -> tuple[nn.Module, int]:
        raise NotImplementedError

    def normalise(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fg_reduce(self.feature_map(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        with float32(x.device):
            z = self.normalise(self.fg_pool(x.float()))
        z = self.drop(z.to(x.dtype))  # back to the features' dtype: DeepSpeed bf16/fp16 casts the weights
        return z if pre_logits else self.fg_head(z)


class _Fn(nn.Module):
    """A parameter-free pooling function as a module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BilinearModel(_SecondOrderModel):
    def make_pool(self, channels: int) -> tuple[nn.Module, int]:
        return _Fn(lambda x: bilinear_pool(x).flatten(1)), channels ** 2

    def normalise(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(signed_sqrt(pooled), dim=1)


class CompactBilinearModel(BilinearModel):
    def __init__(self, backbone: nn.Module, num_classes: int, *, reduce_dim: Optional[int], dropout: float,
                 sketch_dim: int, seed: int) -> None:
        self.sketch = {"dim": sketch_dim, "seed": seed}  # read by make_pool during the base __init__
        super().__init__(backbone, num_classes, reduce_dim=reduce_dim, dropout=dropout)

    def make_pool(self, channels: int) -> tuple[nn.Module, int]:
        return TensorSketch(channels, self.sketch["dim"], self.sketch["seed"]), self.sketch["dim"]


class CovarianceModel(_SecondOrderModel):
    def __init__(self, backbone: nn.Module, num_classes: int, *, reduce_dim: Optional[int], dropout: float,
                 iterations: int) -> None:
        self.iterations = iterations
        super().__init__(backbone, num_classes, reduce_dim=reduce_dim, dropout=dropout)

    def make_pool(self, channels: int) -> tuple[nn.Module, int]:
        iterations = self.iterations
        return (_Fn(lambda x: upper_triangle(newton_schulz_sqrt(covariance(x), iterations))),
                channels * (channels + 1) // 2)


# ----------------------------------------------------------------------------- registered methods
@register_method
class BCNN(Method):
    """B-CNN: bilinear (outer-product) pooling, signed square root, L2 normalisation, linear classifier."""

    name = "bcnn"
    options = {"reduce_dim": None, "dropout": 0.0}
    architecture = ("reduce_dim",)
    requires = frozenset({"feature_map"})
    paper = "Lin et al., Bilinear CNN Models for Fine-grained Visual Recognition, ICCV 2015"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return BilinearModel(backbone, num_classes, reduce_dim=self.opts["reduce_dim"], dropout=self.opts["dropout"])


@register_method
class CompactBilinear(Method):
    """Compact bilinear pooling (Tensor Sketch), signed square root, L2 normalisation, linear classifier."""

    name = "cbp"
    options = {"reduce_dim": None, "dropout": 0.0, "sketch_dim": 8192, "seed": 0}
    architecture = ("reduce_dim", "sketch_dim", "seed")
    requires = frozenset({"feature_map"})
    paper = "Gao et al., Compact Bilinear Pooling, CVPR 2016"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        o = self.opts
        return CompactBilinearModel(backbone, num_classes, reduce_dim=o["reduce_dim"], dropout=o["dropout"],
                                    sketch_dim=o["sketch_dim"], seed=o["seed"])


@register_method
class ISqrtCov(Method):
    """iSQRT-COV: 1x1 reduction, covariance pooling, Newton-Schulz matrix square root, upper triangle."""

    name = "isqrt_cov"
    options = {"reduce_dim": 256, "dropout": 0.0, "iterations": 5}
    architecture = ("reduce_dim",)
    requires = frozenset({"feature_map"})
    paper = ("Li et al., Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix "
             "Square Root Normalization, CVPR 2018")

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        o = self.opts
        return CovarianceModel(backbone, num_classes, reduce_dim=o["reduce_dim"], dropout=o["dropout"],
                               iterations=o["iterations"])
