"""The plug-in module: PIM.

Chou, Lin and Kao, "A Novel Plug-in Module for Fine-Grained Visual Classification", arXiv:2202.03822
(2022); official code chou141253/FGVC-PIM (``models/pim_module/pim_module.py``, ``main.py``,
``configs/CUB200_SwinT.yaml``).

On the backbone's last four stages (timm's ``forward_intermediates``):

* FPN: each stage projected to ``fpn_size`` channels (1x1 conv, ReLU, 1x1 conv), then top-down
  ``x_{i-1} += upsample(x_i)``;
* a classifier on every location of every stage (1x1 conv, BN, ReLU, 1x1 conv), trained on the
  location average (``lambda_b``);
* weakly supervised selector: per stage the locations whose softmax is most confident are kept
  (``select_fraction`` of them: the official 2048/9216 ... 32/144 at 384 px are 2/9 of every
  stage), the others' logits are pushed to -1 after tanh (MSE, ``lambda_n``), the kept ones can be
  trained as the class (``lambda_s``, 0 in the official CUB config);
* graph combiner over the kept locations (a learned pooling to ``S / 32`` nodes, an adaptive
  adjacency ``A + tanh(q - k^T) alpha``, one graph convolution, BN, pooling to one node, dropout 0.1)
  and the classifier whose logits are the prediction (``lambda_c``).

``module=False`` switches the plug-in off: the model is then the backbone with its own pooling and
a linear classifier (``fg_head``), i.e. ``plain`` under the same options, for paired ablations.

HERBS (Chou, Kao and Lin, "Fine-grained Visual Classification with High-temperature Refinement and
Background Suppression", arXiv:2303.06442 (2023); official code chou141253/FGVC-HERBS,
``models/pim_module/pim_module.py``, ``main.py``, ``configs/config.yaml``) is PIM plus:

* a bottom-up path after the top-down FPN (``FPN_UP``): every stage's tokens through
  Linear-ReLU-Linear, then ``x_{i+1} += Conv1d_over_positions(x_i)``, with its own location
  classifiers; the stage loss (``lambda_b``), the selector and the combiner use this path;
* high-temperature refinement: the top-down path's location logits learn the bottom-up path's
  (detached) distribution, ``KL(softmax(up / T) || softmax(down / T))`` averaged over every element
  as the official ``nn.KLDivLoss()`` (``lambda_b0``), with ``T = temperature * 0.5 ** (epoch // 10)``;
* background suppression: the selector ranks each stage's locations by the probability of the
  class the stage predicts on average (PIM: by the top probability of each location), and the
  dropped ones are suppressed as in PIM (``lambda_n``); the combiner pools to ``S / 64`` nodes.

Deviations: the stages' upsampling is bilinear to the next stage's size for every backbone (the
official code uses a learned 1d projection over token positions for Swin), and selection counts are
fractions of each stage's locations, so any image size works (one fraction for all stages). The
stages are timm's ``forward_intermediates``: Swin-L at 384 px gives 96/48/24/12 grids, where the
official HERBS (a vendored timm whose Swin stages end with their downsampling) reads 48/24/12/12
and keeps 256/128/64/32 locations; so HERBS here keeps 2,720 locations of 12,240 (a 42-node
graph; official 480, 7 nodes), and its bottom-up path maps 9,216 positions to 2,304 (a 21M-weight
Conv1d) and runs its MLPs on 9,216 tokens: more memory than the official model. The official
evaluation reports the best of several heads (each stage's, the combiner's, sums of the top
ones); fgclf predicts with the combiner. The official
options to switch off only the selector or only the combiner are not offered.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import PartsModel, eval_forward, unwrap_to

STAGES = 4


def _last_stages(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return backbone.forward_intermediates(x, indices=STAGES, intermediates_only=True)


def selection_order(logits: torch.Tensor, *, by_predicted_class: bool = False) -> torch.Tensor:
    """``(B, S)`` location indices of ``(B, S, C)`` logits, the most confident first (see :func:`select_tokens`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if by_predicted_class:
        predicted = logits.float().mean(1).argmax(-1)
        confidence = probs.gather(2, predicted[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(-1)
    else:
        confidence = probs.amax(-1)
    return torch.argsort(confidence, dim=1, descending=True)


def select_tokens(features: torch.Tensor, logits: torch.Tensor, count: int, *, by_predicted_class: bool = False) -> tuple:
    """The ``count`` locations with the most confident softmax, best first, and the others:
    ``(kept features, kept logits, dropped logits)`` of ``(B, S, C)`` inputs.

    Confidence is each location's top class probability (PIM) or, ``by_predicted_class``, its
    probability of the class the locations' mean logits predict for the image (HERBS).
    """
    order = selection_order(logits, by_predicted_class=by_predicted_class)
    keep, drop = order[:, :count], order[:, count:]

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))
    return take(features, keep), take(logits, keep), take(logits, drop)


class FPN(nn.Module):
    """Per-stage projection to ``size`` channels and the top-down sum (bilinear upsampling)."""

    def __init__(self, channels: list[int], size: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, size, 1)) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [p(m) for p, m in zip(self.proj, maps)]
        for i in range(len(out) - 1, 0, -1):
            up = out[i] if out[i].shape[-2:] == out[i - 1].shape[-2:] else F.interpolate(
                out[i], size=out[i - 1].shape[-2:], mode="bilinear", align_corners=False)
            out[i - 1] = out[i - 1] + up
        return out


class BottomUp(nn.Module):
    """HERBS' bottom-up path (the official ``FPN_UP``) on ``(B, S_i, C)`` tokens: each stage through
    Linear-ReLU-Linear, then ``x_{i+1} += Conv1d(S_i -> S_{i+1})(x_i)`` from the finest stage up."""

    def __init__(self, size: int, locations: list[int]) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Linear(size, size))
                                  for _ in locations)
        self.down = nn.ModuleList(nn.Conv1d(a, b, 1) for a, b in zip(locations[:-1], locations[1:]))

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [p(t) for p, t in zip(self.proj, tokens)]
        for i, down in enumerate(self.down):
            out[i + 1] = out[i + 1] + down(out[i])
        return out


class LocationClassifiers(nn.Module):
    """One classifier per stage on every location: conv1d, BN, ReLU, conv1d (the official ones)."""

    def __init__(self, size: int, num_classes: int, stages: int) -> None:
        super().__init__()
        self.size = size
        self.heads = nn.ModuleList(self._head(num_classes) for _ in range(stages))

    def _head(self, num_classes: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv1d(self.size, self.size, 1), nn.BatchNorm1d(self.size), nn.ReLU(),
                             nn.Conv1d(self.size, max(num_classes, 1), 1))

    def reset(self, num_classes: int) -> None:
        for head in self.heads:
            head[3] = nn.Conv1d(self.size, max(num_classes, 1), 1)

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(B, S, C)`` tokens -> ``(B, S, classes)`` logits."""
        return [head(t.transpose(1, 2)).transpose(1, 2) for head, t in zip(self.heads, tokens)]


class GraphCombiner(nn.Module):
    """The official ``GCNCombiner`` (with FPN): nodes from the kept locations (``total_selected //
    per_node`` of them: 32 in PIM, 64 in HERBS), one adaptive graph convolution, pooled to one node;
    the classifier is the model's ``fg_head``."""

    def __init__(self, size: int, total_selected: int, dropout: float = 0.1, per_node: int = 32) -> None:
        super().__init__()
        joints = max(total_selected // per_node, 1)
        self.pool0 = nn.Linear(total_selected, joints)
        self.adj = nn.Parameter(torch.eye(joints) / 100 + 1 / 100)
        self.conv = nn.Conv1d(size, size, 1)
        self.bn = nn.BatchNorm1d(size)
        self.conv_q, self.conv_k = nn.Conv1d(size, size // 4, 1), nn.Conv1d(size, size // 4, 1)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.pool1 = nn.Linear(joints, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, selected: torch.Tensor) -> torch.Tensor:
        """``(B, S, C)`` kept features -> ``(B, C)``."""
        h = self.pool0(selected.transpose(1, 2))  # (B, C, joints)
        q, k = self.conv_q(h).mean(1), self.conv_k(h).mean(1)
        adjacency = self.adj + torch.tanh(q[:, :, None] - k[:, None, :]) * self.alpha
        h = self.bn(torch.matmul(self.conv(h), adjacency))
        return self.drop(self.pool1(h).flatten(1))


class PIMModel(PartsModel):
    """Backbone stages -> FPN -> location classifiers -> selector -> graph combiner -> ``fg_head``.

    Args:
        backbone: A timm model with ``forward_intermediates`` and at least four stages.
        num_classes: Classes.
        fpn_size: Channels of the FPN (1536, the official Swin-L setting).
        select_fraction: Share of each stage's locations the selector keeps.
        image_size: The training image size (the combiner's size depends on the number of locations);
            ``train_classifier.py`` fills in the run's.
        dropout: The combiner's dropout (0.1).
        module: False: no plug-in; the backbone's own pooled features and ``fg_head`` (plain).
    """

    bottom_up = False  # HERBS' second FPN path
    per_node = 32  # kept locations per graph node

    def __init__(self, backbone: nn.Module, num_classes: int, *, fpn_size: int = 1536,
                 select_fraction: float = 2 / 9, image_size: int | None = None, dropout: float = 0.1,
                 module: bool = True) -> None:
        what = self.what = type(self).__name__[:-len("Model")].lower()
        if module and (not hasattr(backbone, "forward_intermediates") or len(getattr(backbone, "feature_info", [])) < STAGES):
            raise UserError(f"method {what} needs a timm model with forward_intermediates and at least {STAGES} stages "
                            f"(feature_info); {type(backbone).__name__} lacks them")
        if not 0 < select_fraction <= 1:
            raise UserError(f"method.select_fraction must be in (0, 1], got {select_fraction}")
        # not ``self.module``: wrappers (DDP, DeepSpeed) are recognised by that attribute
        self.fpn_size, self.select_fraction, self.plugin = fpn_size, select_fraction, bool(module)
        hw = (int(image_size), int(image_size)) if image_size else None
        super().__init__(backbone, num_classes, features=self._probe if module else self._pooled, image_hw=hw)
        self.new_modules = (("fg_fpn", "fg_locations") + (("fg_fpn_up", "fg_locations_down") if self.bottom_up else ())
                            + ("fg_combiner", "fg_head")) if module else ("fg_head",)
        if module:
            self.fg_fpn = FPN(self.stage_channels, fpn_size)
            self.fg_locations = LocationClassifiers(fpn_size, num_classes, STAGES)
            if self.bottom_up:
                self.fg_fpn_up = BottomUp(fpn_size, [h * w for h, w in self.sizes])
                self.fg_locations_down = LocationClassifiers(fpn_size, num_classes, STAGES)
            self.fg_combiner = GraphCombiner(fpn_size, sum(self.counts), dropout, self.per_node)
            self.num_features = fpn_size
        else:
            self.num_features = self.channels
        self.fg_head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    @staticmethod
    def _pooled(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's own pooled features (its ``forward_head(pre_logits=True)``), as ``plain`` has them."""
        return [backbone.forward_head(backbone.forward_features(x), pre_logits=True)]

    def _probe(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        maps = _last_stages(backbone, x)
        if any(m.ndim != 4 for m in maps):
            raise UserError(f"method {self.what} needs stage outputs as feature maps (NCHW)")
        self.counts = [max(1, round(self.select_fraction * m.shape[-2] * m.shape[-1])) for m in maps]
        self.sizes = [tuple(m.shape[-2:]) for m in maps]
        return maps

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.plugin:
            self.fg_locations.reset(num_classes)
            if self.bottom_up:
                self.fg_locations_down.reset(num_classes)

    def parts(self, x: torch.Tensor) -> dict:
        """The prediction and what the losses need: ``logits``, ``features`` (the combiner's output),
        ``locations`` (per stage ``(B, S, classes)``), ``kept`` / ``dropped`` (the selector's split of
        them) and, in HERBS, ``refined`` (the top-down path's location logits)."""
        if not self.plugin:
            pooled = self._pooled(self.backbone, x)[0]
            return {"logits": self.fg_head(pooled), "features": pooled}
        maps = self.fg_fpn(_last_stages(self.backbone, x))
        if [tuple(m.shape[-2:]) for m in maps] != self.sizes:
            raise UserError(f"method {self.what} was built for stage sizes {self.sizes} (method.image_size); the images give "
                            f"{[tuple(m.shape[-2:]) for m in maps]}")
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]
        out = {}
        if self.bottom_up:
            if self.training:  # only the refinement loss reads the top-down path's logits
                out["refined"] = self.fg_locations_down(tokens)
            tokens = self.fg_fpn_up(tokens)
        logits = self.fg_locations(tokens)
        kept_features, kept_logits, dropped_logits = [], [], []
        if not self.training:  # what the pictures draw: the kept locations of the third stage
            self.last_kept = selection_order(logits[STAGES - 2].detach(), by_predicted_class=self.bottom_up)[
                :, :self.counts[STAGES - 2]]
        for t, lg, count in zip(tokens, logits, self.counts):
            f, kl, dl = select_tokens(t, lg, count, by_predicted_class=self.bottom_up)
            kept_features.append(f)
            kept_logits.append(kl)
            dropped_logits.append(dl)
        pooled = self.fg_combiner(torch.cat(kept_features, dim=1))
        out.update(logits=self.fg_head(pooled), features=pooled, locations=logits, kept=kept_logits,
                   dropped=dropped_logits)
        return out



class HERBSModel(PIMModel):
    """PIM with HERBS' bottom-up path, class-guided selection and 64 kept locations per graph node."""

    bottom_up = True
    per_node = 64


@register_method
class PIM(Method):
    """PIM: FPN over four stages, per-location classifiers, a confidence selector and a graph combiner."""

    name = "pim"
    options = {"fpn_size": 1536, "select_fraction": 2 / 9, "lambda_b": 0.5, "lambda_s": 0.0, "lambda_n": 5.0,
               "lambda_c": 1.0, "image_size": None, "dropout": 0.1, "module": True}
    requires = frozenset({"stages", "hard_labels", "image_size"})
    architecture = ("fpn_size", "select_fraction", "image_size", "module")
    paper = "Chou et al., A Novel Plug-in Module for Fine-Grained Visual Classification, 2022"
    model_class = PIMModel

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return self.model_class(backbone, num_classes, fpn_size=int(self.opts["fpn_size"]),
                                select_fraction=float(self.opts["select_fraction"]), image_size=self.opts["image_size"],
                                dropout=float(self.opts["dropout"]), module=bool(self.opts["module"]))

    def draw(self, accelerator, model: nn.Module, images: torch.Tensor, path: Path) -> None:
        draw_selection(self, accelerator, model, images, path)

    def extra_terms(self, out: dict, ctx: StepContext) -> tuple[torch.Tensor | float, dict]:
        """Losses a subclass adds to PIM's (weighted, and their named terms)."""
        return 0.0, {}

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        o = self.opts
        out = model(ctx.inputs(images), return_parts=True)
        combined = self.criterion(out["logits"], labels)
        penalty, terms = self.penalty(out["logits"])
        if "locations" not in out:  # the module switched off: plain's loss
            return StepOutput(self.add_regularizer(model, combined + penalty), out["logits"], terms)
        classes = out["logits"].shape[-1]
        layer = sum(self.criterion(lg.float().mean(1), labels) for lg in out["locations"])
        kept = torch.cat([k.reshape(-1, classes) for k in out["kept"]])
        kept_labels = torch.cat([labels.repeat_interleave(k.shape[1]) for k in out["kept"]])
        selected = self.criterion(kept, kept_labels) if o["lambda_s"] else kept.new_zeros(())
        dropped = [torch.tanh(d.float()) for d in out["dropped"] if d.shape[1]]
        suppressed = sum(F.mse_loss(d, torch.full_like(d, -1.0)) for d in dropped) if dropped else kept.new_zeros(())
        extra, extra_terms = self.extra_terms(out, ctx)
        loss = (o["lambda_b"] * layer + o["lambda_s"] * selected + o["lambda_n"] * suppressed + o["lambda_c"] * combined
                + extra + penalty)
        terms.update(layers=layer.detach(), selected=selected.detach(), dropped=suppressed.detach(),
                     combiner=combined.detach(), **extra_terms)
        return StepOutput(self.add_regularizer(model, loss), out["logits"], terms)


def draw_selection(method: Method, accelerator, model: nn.Module, images: torch.Tensor, path: Path) -> None:
    """Each test image with the locations the selector keeps on the third of the four stages (the
    second coarsest: e.g. 8 of 6 x 6 at 96 px), drawn as the cells they cover."""
    net = unwrap_to(model, PIMModel)
    if not net.plugin:
        return
    x, _ = eval_forward(model, images, model)
    if accelerator is None or accelerator.is_main_process:
        from fgclf.methods._pictures import part_grid

        stage = STAGES - 2
        (h, w), kept = net.sizes[stage], net.last_kept.cpu()
        cell_h, cell_w = x.shape[-2] / h, x.shape[-1] / w
        boxes = [[(int(i) // w * cell_h, int(i) % w * cell_w, cell_h, cell_w) for i in row] for row in kept]
        part_grid(x.float().cpu(), boxes, path,
                  title=f"{method.name}: the {kept.shape[1]} of {h}x{w} locations the selector keeps (stage {stage + 1} of {STAGES})")


def refinement_loss(refined: list[torch.Tensor], target: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """HERBS' high-temperature refinement: per stage ``KLDivLoss()(log_softmax(refined / T),
    softmax(target.detach() / T))`` (the mean over every element, as the official default
    reduction), summed over the stages."""
    return sum(F.kl_div(F.log_softmax(r.float() / temperature, dim=-1),
                        F.softmax(t.detach().float() / temperature, dim=-1), reduction="sum") / r.numel()
               for r, t in zip(refined, target))


@register_method
class HERBS(PIM):
    """HERBS: PIM with a bottom-up FPN path, high-temperature refinement and class-guided background suppression."""

    name = "herbs"
    options = {**PIM.options, "lambda_b0": 1.375, "lambda_b": 0.3, "temperature": 64.0, "temperature_halving": 10}
    paper = ("Chou et al., Fine-grained Visual Classification with High-temperature Refinement and Background "
             "Suppression, 2023")
    model_class = HERBSModel

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        if not float(self.opts["temperature"]) > 0 or int(self.opts["temperature_halving"]) < 1:
            raise UserError(f"method.temperature must be > 0 and method.temperature_halving >= 1 (epochs), got "
                            f"{self.opts['temperature']} and {self.opts['temperature_halving']}")
        return super().build(backbone, num_classes)

    def temperature(self, epoch: int) -> float:
        """``temperature * 0.5 ** (epoch // temperature_halving)``: 64, then 32 from epoch 10, ... (official)."""
        return float(self.opts["temperature"]) * 0.5 ** (epoch // int(self.opts["temperature_halving"]))

    def extra_terms(self, out: dict, ctx: StepContext) -> tuple[torch.Tensor | float, dict]:
        refine = refinement_loss(out["refined"], out["locations"], self.temperature(ctx.epoch))
        return float(self.opts["lambda_b0"]) * refine, {"refinement": refine.detach()}
