"""Progressive multi-granularity training: PMG.

Du, Chang, Bhunia, Xie, Ma, Song and Guo, "Fine-Grained Visual Classification via Progressive
Multi-Granularity Training of Jigsaw Patches", ECCV 2020; official code
PRIS-CV/PMG-Progressive-Multi-Granularity-Training (``model.py``, ``train.py``, ``utils.py``).

The network reads the backbone's last three stages (timm's ``forward_intermediates``; any CNN with
stages): each goes through a block (1x1 conv to ``feature_size``, 3x3 conv to ``2 x feature_size``,
BatchNorm + ReLU each), global max pooling and its own classifier (BN, linear, BN, ELU, linear);
the concatenation of the three pooled vectors has a fourth classifier (``fg_head``). Each batch
trains in four steps, fine to coarse: the images cut into an 8 x 8 jigsaw of shuffled patches
train the shallowest classifier, 4 x 4 the middle one, 2 x 2 the deepest, and the whole image the
concatenated classifier (loss x2), each with its own optimizer step, as the official code does
(``--method.steps sum`` adds the four losses for one step instead). Inference adds the four
classifiers' logits (the paper's "combined" prediction; ``--method.inference concat`` uses the
last one alone).

Deviations: the jigsaw permutation is a uniformly random one drawn from ``StepContext`` (the same on
every process and after a resume; the official code composes n^2 swaps with the first patch);
pixels beyond ``n x (H // n)`` (images not divisible by ``n``) stay in place; the other
classifiers' outputs enter each step's loss with weight 0 so that every parameter has a (zero)
gradient, as under DDP, and as in the official code on the PyTorch of 2020, whose ``zero_grad()``
left zero gradients that SGD then decayed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import MethodModel


def jigsaw(images: torch.Tensor, n: int, order: torch.Tensor) -> torch.Tensor:
    """The images cut into ``n x n`` patches of side ``H // n`` (``W // n``), patch ``order[k]`` moved to
    position ``k`` (row-major); the same arrangement for every image of the batch."""
    if n == 1:
        return images
    b, c, h, w = images.shape
    ph, pw = h // n, w // n
    if ph == 0 or pw == 0:
        raise UserError(f"PMG: a {n} x {n} jigsaw needs images of at least {n} px, got {h} x {w}")
    core = images[..., :n * ph, :n * pw].reshape(b, c, n, ph, n, pw).permute(0, 1, 2, 4, 3, 5)
    core = core.reshape(b, c, n * n, ph, pw)[:, :, order.to(images.device)]
    core = core.reshape(b, c, n, n, ph, pw).permute(0, 1, 2, 4, 3, 5).reshape(b, c, n * ph, n * pw)
    out = images.clone()
    out[..., :n * ph, :n * pw] = core
    return out


def _last_stages(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return backbone.forward_intermediates(x, indices=3, intermediates_only=True)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    # the official BasicConv: conv without bias, BatchNorm with momentum 0.01, ReLU
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout, momentum=0.01), nn.ReLU())


def _classifier(cin: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(cin), nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ELU(inplace=True),
                         nn.Linear(hidden, classes))


class PMGModel(MethodModel):
    """Three stage blocks and classifiers plus the concatenated classifier ``fg_head``.

    Args:
        backbone: A timm CNN with ``forward_intermediates`` and at least three stages of decreasing
            resolution.
        num_classes: Classes.
        feature_size: Width of the blocks' 1x1 convs and of the classifiers' hidden layer (512).
        combined: Inference adds the four classifiers' logits (else: ``fg_head``'s alone).
    """

    # separate attributes, not ModuleLists: PEFT's modules_to_save wraps each as a whole
    new_modules = ("fg_block1", "fg_block2", "fg_block3", "fg_classifier1", "fg_classifier2", "fg_classifier3",
                   "fg_head")
    classifier_name = "fg_head.4"

    def __init__(self, backbone: nn.Module, num_classes: int, *, feature_size: int = 512, combined: bool = True):
        if not hasattr(backbone, "forward_intermediates") or len(getattr(backbone, "feature_info", [])) < 3:
            raise UserError(f"method pmg needs a timm CNN with forward_intermediates and at least 3 stages; "
                            f"{type(backbone).__name__} has neither")
        reductions = [f["reduction"] for f in backbone.feature_info[-3:]]
        if not reductions[0] < reductions[1] < reductions[2]:
            raise UserError(f"method pmg needs stages of decreasing resolution (a CNN); {type(backbone).__name__}'s "
                            f"last three have strides {reductions}")
        super().__init__(backbone, num_classes, features=_last_stages)
        width = 2 * feature_size
        self.feature_size, self.combined = feature_size, combined
        for i, c in enumerate(self.stage_channels, start=1):
            setattr(self, f"fg_block{i}", nn.Sequential(_conv_bn_relu(c, feature_size, 1),
                                                        _conv_bn_relu(feature_size, width, 3)))
            setattr(self, f"fg_classifier{i}", _classifier(width, feature_size, num_classes))
        self.num_features = 3 * width
        self.fg_head = _classifier(self.num_features, feature_size, num_classes)

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.fg_block1, self.fg_block2, self.fg_block3]

    @property
    def classifiers(self) -> list[nn.Module]:
        return [self.fg_classifier1, self.fg_classifier2, self.fg_classifier3]

    def get_classifier(self) -> nn.Module:
        return self.fg_head[4]

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        for classifier in (*self.classifiers, self.fg_head):  # 0 classes: the hidden features (feature extraction)
            classifier[4] = nn.Linear(self.feature_size, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The three stage blocks' max-pooled outputs, concatenated: ``(B, 3 x 2 feature_size)``."""
        maps = _last_stages(self.backbone, x)
        return torch.cat([torch.amax(block(m), dim=(2, 3)) for block, m in zip(self.blocks, maps)], dim=1)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the three stage classifiers and of the concatenated one."""
        pooled = self.forward_features(x)
        chunks = pooled.chunk(3, dim=1)
        return [c(z) for c, z in zip(self.classifiers, chunks)] + [self.fg_head(pooled)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        out = self.fg_head(x)
        if self.combined:
            out = out + sum(c(z) for c, z in zip(self.classifiers, x.chunk(3, dim=1)))
        return out

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        if return_parts:
            return self.parts(x)
        return self.forward_head(self.forward_features(x))


@register_method
class PMG(Method):
    """PMG: jigsaw patches at 8 x 8, 4 x 4 and 2 x 2 train the last three stages' classifiers, fine to
    coarse, then the whole image trains their concatenation; inference adds all four."""

    name = "pmg"
    options = {"granularities": (8, 4, 2), "feature_size": 512, "steps": "separate", "inference": "combined",
               "concat_weight": 2.0}
    requires = frozenset({"feature_map", "stages"})
    architecture = ("feature_size",)
    paper = "Du et al., Fine-Grained Visual Classification via Progressive Multi-Granularity Training, ECCV 2020"

    def __init__(self, parts=None, **options) -> None:
        super().__init__(parts, **options)
        o = self.opts
        if len(o["granularities"]) != 3 or any(int(n) < 1 for n in o["granularities"]):
            raise UserError(f"method.granularities must be three jigsaw sizes such as [8, 4, 2], got {o['granularities']}")
        if o["steps"] not in ("separate", "sum"):
            raise UserError(f"method.steps must be separate (one optimizer step per granularity) or sum, got {o['steps']}")
        if o["inference"] not in ("combined", "concat"):
            raise UserError(f"method.inference must be combined or concat, got {o['inference']}")
        self.substeps = 4 if o["steps"] == "separate" else 1

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return PMGModel(backbone, num_classes, feature_size=self.opts["feature_size"],
                        combined=self.opts["inference"] == "combined")

    def _granularity_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int,
                          ctx: StepContext) -> tuple:
        """Step ``k`` (0-2: jigsaw granularities, 3: the whole image): its loss, logits, logit penalty and
        penalty term; the other classifiers enter with weight 0, so every parameter gets a gradient."""
        if k < 3:
            n = int(self.opts["granularities"][k])
            images = jigsaw(images, n, ctx.shared_randperm(n * n))
        outputs = model(ctx.inputs(images), return_parts=True)
        weight = self.opts["concat_weight"] if k == 3 else 1.0
        loss = weight * self.criterion(outputs[k], labels)
        penalty, terms = self.penalty(outputs[k]) if k == 3 else (0.0, {})  # on the whole image's prediction
        zero = sum(o.float().sum() for i, o in enumerate(outputs) if i != k) * 0.0
        return loss + zero, outputs[k], penalty, terms

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        names = [f"jigsaw_{int(n)}" for n in self.opts["granularities"]] + ["concat"]
        steps = [ctx.substep] if self.substeps > 1 else range(4)
        total, terms, logits = 0.0, {}, None
        for k in steps:
            loss, logits, penalty, penalty_terms = self._granularity_loss(model, images, labels, k, ctx)
            terms[names[k]] = loss.detach()
            terms.update(penalty_terms)
            total = total + loss + penalty
        return StepOutput(self.add_regularizer(model, total), logits, terms)
