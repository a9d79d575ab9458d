"""Classification losses and parameter regularisers by name.

``create_loss(name, **kwargs)`` builds a loss from :data:`LOSSES`; every loss is an ``nn.Module``
called as ``loss(logits, target)`` with ``logits`` of shape (N, C) and ``target`` either integer
class indices (N,) or soft targets (N, C) whose rows sum to 1 (what timm's ``Mixup``/``CutMix``
produce). A one-hot soft target gives the same value and gradient as its class index.

* ``ce`` (``label_smoothing=0.0, class_weights=None``): cross-entropy, torch's exactly for indices;
* ``label_smoothing`` (``label_smoothing=0.1, class_weights=None``): ``ce`` with smoothing on;
* ``focal`` (``gamma=2.0, alpha=None, class_weights=None``): focal loss (Lin et al. 2017);
* ``soft_target_ce`` (no options): timm's ``SoftTargetCrossEntropy``, the mixup/cutmix loss.

Per-class weights for long-tailed data come from :func:`class_balanced_weights` (Cui et al. 2019).

Reduction is a mean over the batch. With ``class_weights`` ``w`` it is a weighted mean: for
integer targets exactly ``F.cross_entropy(weight=w)``, i.e. ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
(label smoothing included, as torch does it). For soft targets each unit of target mass on class
``c`` carries weight ``w_c``: ``sum_{i,c} w_c t_ic l_ic / sum_{i,c} w_c t_ic``, where ``t_ic l_ic``
is the (i, c) term of the loss (for ``ce``, ``-t'_ic log p_ic`` with ``t'`` the smoothed target);
this reduces to the integer rule for one-hot rows. (torch's own soft-target path divides by N instead; ours keeps
one-hot and index targets identical.) With mixup, leave ``label_smoothing`` at 0 here: timm's
``Mixup(label_smoothing=...)`` already smooths the targets it returns. Soft rows are not checked
to sum to 1 (that would cost a device sync per step). float16/bfloat16 logits are reduced in float32.

Regularisers are penalties added to the loss, separate from the optimizer's ``weight_decay``:
``create_regularizer("l1", weight=1e-5)(model)`` returns a scalar to add to the loss. Which to use:

* the usual L2 is the optimizer's decoupled ``weight_decay`` (AdamW); an ``l2`` penalty in the loss
  is *not* the same thing under Adam-type optimizers, whose per-parameter step size rescales the
  penalty's gradient (Loshchilov & Hutter 2019); under plain SGD the two coincide up to a factor 2
  (``d/dθ w·θ² = 2wθ``). Use ``l2`` only to reproduce coupled-L2 baselines;
* ``l1`` pulls weights towards zero at a constant rate: sparse, pruning-friendly layers (with
  (sub)gradient steps they end near zero rather than exactly at it; prune by a threshold);
* ``lp`` with ``p=inf`` penalises only the single largest ``|θ_i|``: it bounds the largest weight
  without shrinking the rest.
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.registry import Registry

__all__ = [
    "LOSSES", "REGULARIZERS", "CrossEntropyLoss", "FocalLoss", "LpPenalty", "class_balanced_weights",
    "create_loss", "create_regularizer", "list_losses", "list_regularizers",
]

LOSSES: Registry[nn.Module] = Registry("loss")
REGULARIZERS: Registry["LpPenalty"] = Registry("regularizer")
LOGIT_PENALTIES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("confusion penalty")

WeightsLike = Union[torch.Tensor, Sequence[float]]


# ----------------------------------------------------------------------------- validation helpers
def _per_class(values: WeightsLike, what: str) -> torch.Tensor:
    """A 1-D float tensor of finite, non-negative per-class values (not all zero)."""
    try:
        t = torch.as_tensor(values, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{what} must be a list or 1-D tensor of numbers; got {values!r}") from exc
    if t.ndim != 1 or t.numel() == 0:
        raise UserError(f"{what} must be a non-empty list or 1-D tensor (one value per class); got shape "
                        f"{tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any() or not (t > 0).any():
        raise UserError(f"{what} must be finite, >= 0 and not all zero; got {t.tolist()}")
    return t


def _check_per_class(t: Optional[torch.Tensor], num_classes: int, what: str) -> None:
    if t is not None and t.numel() != num_classes:
        raise UserError(f"{what} has {t.numel()} values but the logits have {num_classes} classes")


def _soft_or_index(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Validate shapes; returns ``target`` as int64 indices (N,) or as the float (N, C) rows."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(logits.shape)}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}; "
                             f"got {tuple(target.shape)}")
        return target
    if target.dtype in (torch.bool, torch.complex64, torch.complex128) or target.shape != logits.shape[:1]:
        raise ValueError(f"target must be int class indices of shape ({logits.shape[0]},) or float soft "
                         f"targets of shape {tuple(logits.shape)}; got {target.dtype} {tuple(target.shape)}")
    return target.long()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits are reduced in float32 (as CUDA autocast does for cross-entropy)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _soft_mean(neg_terms: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Reduce per-(sample, class) terms ``-t_ic q_ic`` (N, C) with the weighted-mean rule above."""
    if weight is None:
        return neg_terms.sum(1).mean()
    return (neg_terms * weight).sum() / (target * weight).sum()


class _ClassWeighted(nn.Module):
    """Holds optional ``class_weights`` as a (non-persistent) buffer that follows ``.to()``."""

    class_weights: Optional[torch.Tensor]

    def __init__(self, class_weights: Optional[WeightsLike]) -> None:
        super().__init__()
        weights = None if class_weights is None else _per_class(class_weights, "class_weights")
        self.register_buffer("class_weights", weights, persistent=False)

    def _weight(self, num_classes: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        _check_per_class(self.class_weights, num_classes, "class_weights")
        return None if self.class_weights is None else self.class_weights.to(like.device, like.dtype)

    def weight_sum(self, logits: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        """The weighted mean's normaliser for this batch (``sum_i w_{y_i}``; soft: ``sum w_c t_ic``), or None."""
        weight = self._weight(logits.shape[1], logits)
        if weight is None:
            return None
        target = _soft_or_index(logits, target)
        weight = weight.float()
        return (target.float() * weight).sum() if target.is_floating_point() else weight[target].sum()


class GlobalWeightedMean(nn.Module):
    """A class-weighted loss whose normaliser is the *global* batch's weight sum.

    Each of ``W`` data-parallel processes computes ``sum_local w l / sum_local w``, and DDP then
    averages the gradients: the mean of per-process weighted means, not the weighted mean of the
    whole batch (each shard's classes weigh differently). This rescales process ``r``'s loss by
    ``W * S_r / S`` (``S_r``: its weight sum, ``S``: all-reduced), so the average over processes is
    exactly ``sum_all w l / sum_all w``, the single-process value. One tiny all-reduce per step.

    Args:
        loss: A loss with class weights (``weight_sum``).
        accelerator: The run's ``Accelerator`` (its ``reduce`` and process count).
    """

    def __init__(self, loss: nn.Module, accelerator) -> None:
        super().__init__()
        self.loss, self.accelerator = loss, accelerator

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = self.loss(logits, target)
        local = self.loss.weight_sum(logits, target).detach()
        total = self.accelerator.reduce(local.clone(), "sum")
        return value * (local * self.accelerator.num_processes / total.clamp_min(torch.finfo(total.dtype).tiny))


# ----------------------------------------------------------------------------- losses
class CrossEntropyLoss(_ClassWeighted):
    """Cross-entropy on class indices or soft targets, with label smoothing and class weights.

    Integer targets go straight to ``F.cross_entropy(weight=, label_smoothing=)``. Soft targets
    ``t`` are smoothed the same way (``(1 - eps) t + eps / C``) and reduced by :func:`_soft_mean`.

    Args:
        label_smoothing: ``eps`` in [0, 1].
        class_weights: Optional C non-negative per-class weights (weighted-mean reduction).
    """

    def __init__(self, *, label_smoothing: float = 0.0, class_weights: Optional[WeightsLike] = None) -> None:
        super().__init__(class_weights)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise UserError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _soft_or_index(logits, target)
        logits = _upcast(logits)
        weight = self._weight(logits.shape[1], logits)
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)
        logp = F.log_softmax(logits, dim=1)
        eps = self.label_smoothing
        smoothed = target if eps == 0 else target * (1 - eps) + eps / logits.shape[1]
        return _soft_mean(-(smoothed * logp), target, None if weight is None else weight.to(logp.dtype))

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, class_weights={self.class_weights is not None}"


class FocalLoss(_ClassWeighted):
    """Softmax focal loss ``-alpha_y (1 - p_y)^gamma log p_y`` (Lin et al. 2017).

    Soft targets use the soft generalisation ``sum_c -t_c alpha_c (1 - p_c)^gamma log p_c``, which
    equals the index form for one-hot rows. With ``gamma=0`` and ``alpha=None`` it is exactly
    :class:`CrossEntropyLoss` (same ops for index targets). ``alpha`` scales each class's term;
    ``class_weights`` additionally sets the weighted-mean normaliser (see the module docstring).

    Args:
        gamma: Focusing parameter, >= 0 (2.0 in the paper).
        alpha: None, a scalar (one factor for every class: softmax focal loss has no positive /
            negative split, so unlike sigmoid focal loss there is no ``1 - alpha``), or C values.
        class_weights: Optional C non-negative per-class weights.
    """

    alpha: Optional[torch.Tensor]

    def __init__(self, *, gamma: float = 2.0, alpha: Optional[Union[float, WeightsLike]] = None,
                 class_weights: Optional[WeightsLike] = None) -> None:
        super().__init__(class_weights)
        if not (math.isfinite(float(gamma)) and float(gamma) >= 0):
            raise UserError(f"focal gamma must be a finite number >= 0; got {gamma}")
        self.gamma = float(gamma)
        if isinstance(alpha, torch.Tensor) and alpha.ndim == 0:
            alpha = float(alpha)
        if isinstance(alpha, (int, float)):
            if not (math.isfinite(alpha) and alpha > 0):
                raise UserError(f"focal alpha must be > 0; got {alpha}")
            alpha_t: Optional[torch.Tensor] = torch.tensor(float(alpha))
        else:
            alpha_t = None if alpha is None else _per_class(alpha, "focal alpha")
        self.register_buffer("alpha", alpha_t, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _soft_or_index(logits, target)
        logits = _upcast(logits)
        weight = self._weight(logits.shape[1], logits)
        if self.alpha is not None and self.alpha.ndim == 1:
            _check_per_class(self.alpha, logits.shape[1], "focal alpha")
        logp = F.log_softmax(logits, dim=1)
        q = logp  # the per-class "log-likelihood" term, modulated below
        if self.gamma != 0:
            # 1 - p = -expm1(log p) is accurate for p near 1; the clamp keeps (1-p)^gamma's gradient
            # finite for gamma < 1 when p rounds to exactly 1.
            one_minus_p = (-torch.expm1(logp)).clamp_min(torch.finfo(logp.dtype).tiny)
            q = q * one_minus_p.pow(self.gamma)
        if self.alpha is not None:
            q = q * self.alpha.to(logp.device, logp.dtype)
        if weight is not None:
            weight = weight.to(logp.dtype)
        if not target.is_floating_point():
            return F.nll_loss(q, target, weight=weight)  # = F.cross_entropy when q is log p
        return _soft_mean(-(target * q), target, weight)

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else self.alpha.tolist()
        return f"gamma={self.gamma}, alpha={alpha}, class_weights={self.class_weights is not None}"


@LOSSES.register("ce")
def _ce(*, label_smoothing: float = 0.0, class_weights: Optional[WeightsLike] = None) -> nn.Module:
    """Cross-entropy (optionally smoothed / class-weighted)."""
    return CrossEntropyLoss(label_smoothing=label_smoothing, class_weights=class_weights)


@LOSSES.register("label_smoothing")
def _label_smoothing(*, label_smoothing: float = 0.1, class_weights: Optional[WeightsLike] = None) -> nn.Module:
    """Cross-entropy with label smoothing on by default (0.1, as in Szegedy et al. 2016)."""
    return CrossEntropyLoss(label_smoothing=label_smoothing, class_weights=class_weights)


@LOSSES.register("focal")
def _focal(*, gamma: float = 2.0, alpha: Optional[Union[float, WeightsLike]] = None,
           class_weights: Optional[WeightsLike] = None) -> nn.Module:
    """Focal loss; ``gamma=0, alpha=None`` is plain cross-entropy."""
    return FocalLoss(gamma=gamma, alpha=alpha, class_weights=class_weights)


@LOSSES.register("soft_target_ce")
def _soft_target_ce() -> nn.Module:
    """``-sum_c t_c log p_c`` averaged over the batch: the mixup/cutmix loss (timm, DeiT).

    No options: the smoothing belongs in the mixed targets (``Mixup(label_smoothing=)``).
    """
    return CrossEntropyLoss()


def class_balanced_weights(counts: Union[torch.Tensor, Sequence[int]], *, beta: float = 0.999,
                           kind: str = "effective") -> torch.Tensor:
    """Per-class weights from per-class sample counts, normalised to sum to C.

    Args:
        counts: Number of training samples of each class (all >= 1).
        beta: For ``kind="effective"``: Cui et al. 2019's ``beta`` in [0, 1); the weight is
            ``(1 - beta) / (1 - beta^n)`` (inverse effective number). ``beta=0`` gives equal
            weights, ``beta -> 1`` approaches ``1/n``.
        kind: ``"effective"`` or ``"inverse"`` (``1/n``).

    Returns:
        A float32 tensor of C weights summing to C, for ``create_loss(..., class_weights=)``.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.ndim != 1 or n.numel() == 0:
        raise UserError(f"counts must be one count per class (1-D, non-empty); got shape {tuple(n.shape)}")
    if not torch.isfinite(n).all() or (n < 1).any():
        bad = [i for i, c in enumerate(n.tolist()) if not (math.isfinite(c) and c >= 1)]
        raise UserError(f"every class needs a count >= 1 for class-balanced weights; classes {bad[:10]} do not")
    if kind == "effective":
        if not 0.0 <= beta < 1.0:
            raise UserError(f"class-balanced beta must be in [0, 1); got {beta}")
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    elif kind == "inverse":
        w = 1.0 / n
    else:
        raise UserError(f"class-balanced kind must be 'effective' or 'inverse'; got {kind!r}")
    return (w * (n.numel() / w.sum())).to(torch.float32)


# ----------------------------------------------------------------------------- regularisers
class LpPenalty:
    """``weight * sum_theta ||theta||_p^p`` over selected parameters (``weight * max|theta_i|`` for p=inf).

    Call it on the model each step and add the result to the loss. Parameters are re-selected on
    every call, so unfreezing during training is picked up; frozen ones never count.

    Args:
        p: Finite ``p >= 1`` (1: L1, 2: coupled L2) or ``math.inf`` / ``"inf"``.
        weight: Penalty strength, >= 0.
        include: ``"weights"``: only parameters named ``*.weight`` (layer kernels and matrices;
            not ``pos_embed``, ``cls_token``, biases); ``"all"``: every trainable parameter.
        exclude_norm_bias: Also drop biases and every parameter with ``ndim <= 1`` (norm scales
            and shifts, layer-scale gammas), as ``create_optimizer`` does for weight decay.
    """

    def __init__(self, p: Union[float, str], weight: float, *, include: str = "weights",
                 exclude_norm_bias: bool = True) -> None:
        try:
            p = float(p)
        except (TypeError, ValueError) as exc:
            raise UserError(f"penalty p must be a number >= 1 or inf; got {p!r}") from exc
        if math.isnan(p) or p < 1:
            raise UserError(f"penalty p must be >= 1 (or inf): p < 1 is not a norm; got {p}")
        if not (math.isfinite(float(weight)) and float(weight) >= 0):
            raise UserError(f"penalty weight must be a finite number >= 0; got {weight}")
        if include not in ("weights", "all"):
            raise UserError(f"penalty include must be 'weights' or 'all'; got {include!r}")
        self.p, self.weight, self.include, self.exclude_norm_bias = p, float(weight), include, bool(exclude_norm_bias)

    def selected(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The ``(name, parameter)`` pairs the penalty covers."""
        out = []
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if not param.requires_grad or (self.include == "weights" and leaf != "weight"):
                continue
            if self.exclude_norm_bias and (param.ndim <= 1 or leaf == "bias"):
                continue
            out.append((name, param))
        return out

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = [p for _, p in self.selected(model)]
        if not params:
            raise UserError(f"{self!r} selects no trainable parameters of {type(model).__name__}")
        if math.isinf(self.p):
            # amax spreads the gradient evenly over ties; accumulate in float32 for low-precision models
            total = torch.stack([t.abs().amax().float() for t in params]).amax()
        elif self.p == 1:
            total = sum(t.abs().sum(dtype=torch.float32) for t in params)
        elif self.p == 2:
            total = sum(t.square().sum(dtype=torch.float32) for t in params)
        else:
            total = sum(t.abs().pow(self.p).sum(dtype=torch.float32) for t in params)
        return self.weight * total

    def __repr__(self) -> str:
        return (f"LpPenalty(p={self.p:g}, weight={self.weight:g}, include={self.include!r}, "
                f"exclude_norm_bias={self.exclude_norm_bias})")


@REGULARIZERS.register("l1")
def _l1(*, weight: float, include: str = "weights", exclude_norm_bias: bool = True) -> LpPenalty:
    """``weight * sum |theta|``: drives weights to zero (sparsity)."""
    return LpPenalty(1, weight, include=include, exclude_norm_bias=exclude_norm_bias)


@REGULARIZERS.register("l2")
def _l2(*, weight: float, include: str = "weights", exclude_norm_bias: bool = True) -> LpPenalty:
    """``weight * sum theta^2``: coupled L2 (prefer the optimizer's decoupled ``weight_decay``)."""
    return LpPenalty(2, weight, include=include, exclude_norm_bias=exclude_norm_bias)


@REGULARIZERS.register("lp")
def _lp(*, p: Union[float, str], weight: float, include: str = "weights",
        exclude_norm_bias: bool = True) -> LpPenalty:
    """``weight * sum ||theta||_p^p``, or ``weight * max |theta_i|`` for ``p=inf``."""
    return LpPenalty(p, weight, include=include, exclude_norm_bias=exclude_norm_bias)


# ----------------------------------------------------------------------------- penalties on predictions
class PairwiseConfusion:
    """Pairwise Confusion (Dubey et al., "Pairwise Confusion for Fine-Grained Visual Classification",
    ECCV 2018): ``weight * sum_k ||p_2k - p_2k+1||^2 / B`` over the softmax probabilities ``p`` of a
    batch of ``B`` images paired as (0, 1), (2, 3), ...; an odd last image stays unpaired.

    Pulling the predictions of random pairs together keeps the network from being over-confident
    on the small cues of a fine-grained training set. As in the paper's Caffe code (``EuclideanLoss``
    on the two halves of the batch: the squared distance over ``B``) every pair counts, whatever its
    labels. Pairs are neighbours rather than the two halves of the batch so that they stay inside
    each process's part of the global batch: N processes compute what one process does.
    """

    def __init__(self, weight: float) -> None:
        self.weight = _penalty_weight(weight)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1)
        pairs = p.shape[0] // 2
        diff = p[0:2 * pairs:2] - p[1:2 * pairs:2]
        return self.weight * diff.square().sum() / p.shape[0]


class EntropyPenalty:
    """Maximum-entropy training (Dubey et al., "Maximum-Entropy Fine-Grained Classification",
    NeurIPS 2018): ``CE - weight * H(p)``, so this adds ``weight * mean_i sum_c p_ic log p_ic`` (minus
    the mean entropy of the softmax predictions), as the authors' ``EntropicConfusion``."""

    def __init__(self, weight: float) -> None:
        self.weight = _penalty_weight(weight)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1)
        return self.weight * (log_p.exp() * log_p).sum(dim=1).mean()


def _penalty_weight(weight: float) -> float:
    if not (math.isfinite(float(weight)) and float(weight) >= 0):
        raise UserError(f"loss.confusion_weight must be a finite number >= 0; got {weight}")
    return float(weight)


LOGIT_PENALTIES.register("pairwise")(PairwiseConfusion)
LOGIT_PENALTIES.register("entropy")(EntropyPenalty)


# ----------------------------------------------------------------------------- factories
def _build(registry: Registry, name: str, kwargs: dict) -> object:
    """Call ``registry``'s factory, turning unknown / missing keyword arguments into UserErrors."""
    factory: Callable[..., object] = registry.get(name)
    params = inspect.signature(factory).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(params), n=1, cutoff=0.5)
        hint = f"; did you mean: {close[0]}?" if close else ""
        takes = ", ".join(params) or "no options"
        raise UserError(f"{registry.kind} '{name}' got unexpected option '{unknown[0]}'{hint} (it takes: {takes})")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise UserError(f"{registry.kind} '{name}' needs {', '.join(missing)}")
    return factory(**kwargs)


def list_losses() -> list[str]:
    """Registered loss names."""
    return LOSSES.names()


def create_loss(name: str = "ce", **kwargs: object) -> nn.Module:
    """Build the loss ``name`` (unknown names or options raise a UserError with suggestions).

    Args:
        name: Any :func:`list_losses` name.
        **kwargs: That loss's options (see the module docstring's table).

    Returns:
        An ``nn.Module`` called as ``loss(logits, target)`` -> scalar.
    """
    return _build(LOSSES, name, kwargs)


def list_regularizers() -> list[str]:
    """Registered regulariser names."""
    return REGULARIZERS.names()


def create_regularizer(name: str, **kwargs: object) -> LpPenalty:
    """Build the regulariser ``name``: ``l1``/``l2`` need ``weight``, ``lp`` needs ``p`` and ``weight``.

    Returns:
        A callable ``penalty(model)`` -> scalar tensor to add to the loss.
    """
    return _build(REGULARIZERS, name, kwargs)


def list_logit_penalties() -> list[str]:
    """Registered penalties on the batch's predictions (``loss.confusion``)."""
    return LOGIT_PENALTIES.names()


def create_logit_penalty(name: str, *, weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pairwise`` (:class:`PairwiseConfusion`) or ``entropy`` (:class:`EntropyPenalty`) with ``weight``.

    Returns:
        A callable ``penalty(logits)`` -> scalar tensor to add to the loss.
    """
    return LOGIT_PENALTIES.get(name)(weight)
