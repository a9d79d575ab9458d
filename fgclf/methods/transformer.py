"""Transformer part selection: TransFG on timm ViTs.

He, Chen, Liu, Kortylewski, Yang, Bai and Wang, "TransFG: A Transformer Architecture for Fine-Grained
Recognition", AAAI 2022; official code TACJu/TransFG (``models/modeling.py``: ``Part_Attention``,
``Encoder``, ``con_loss``).

* Overlapping patches: the patch embedding's stride becomes ``slide_step`` (12 for 16 px patches),
  so neighbouring patches share pixels; the pretrained position embeddings are resampled to the
  larger grid.
* Part selection: the attention probabilities of every layer but the last are multiplied
  (``A_{L-1} ... A_2 A_1``, the rollout without residual terms, as the official code); for each
  head the patch token the class token attends to most is kept, and the last layer sees only the
  class token(s) and these ``heads`` part tokens.
* Contrastive loss on the normalised class-token features:
  ``sum_{same class} (1 - cos) + sum_{other class} max(cos - alpha, 0)``, over ``B^2``
  pairs (alpha 0.4), added to the cross-entropy.

The attention probabilities come from forward hooks on timm's ``attn.qkv`` layers, registered for
the pass only (recomputed without gradient from the captured q and k: the selection is an argmax,
so it needs none) and multiplied into one running product, so timm's blocks run unchanged, with
their fused attention kernels, and one ``heads x N x N`` map per image is kept (at 448 px and
stride 12, N = 1,370: 90 MB an image in float32, where keeping every layer's would take 11 times
that). ``set_grad_checkpointing`` is honoured. On several processes the contrastive
loss sees the whole global batch (a differentiable all-gather), so N processes train as one.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods._base import Method, StepContext, StepOutput, register_method
from fgclf.methods._model import MethodModel


def overlap_patches(backbone: nn.Module, slide_step: int) -> None:
    """Make a timm ViT's patch embedding overlap: conv stride ``slide_step`` (< the patch size), the
    grid ``(size - patch) // step + 1``, the position embeddings resampled to it (bicubic, as timm
    resamples them; a ``dynamic_img_size`` ViT resamples them again for other image sizes). A step
    equal to the patch size changes nothing."""
    from timm.layers import resample_abs_pos_embed

    pe = backbone.patch_embed
    patch = pe.patch_size
    if slide_step < 1 or slide_step > min(patch):
        raise UserError(f"method.slide_step must be in 1..{min(patch)} (the patch size), got {slide_step}")
    if pe.img_size is None:
        raise UserError("method transfg needs a ViT built for an image size (its patch grid)")
    if slide_step == min(patch) and tuple(pe.proj.stride) == tuple(patch):
        return
    old = tuple(pe.grid_size)
    grid = tuple((s - p) // slide_step + 1 for s, p in zip(pe.img_size, patch))
    pe.proj.stride = (slide_step, slide_step)
    pe.grid_size, pe.num_patches = grid, grid[0] * grid[1]
    if backbone.pos_embed is not None:
        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        with torch.no_grad():
            resampled = resample_abs_pos_embed(backbone.pos_embed.data, new_size=list(grid), old_size=list(old),
                                               num_prefix_tokens=prefix)
        backbone.pos_embed = nn.Parameter(resampled)


def select_parts(rollout: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """For each head, the patch token the class token attends to most: ``(B, heads)`` token indices
    (counted from the first patch token)."""
    return rollout[:, :, 0, num_prefix_tokens:].argmax(dim=2)


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """TransFG's ``con_loss``: over all ``B^2`` pairs of L2-normalised features, ``1 - cos`` for pairs of
    the same class and ``max(cos - alpha, 0)`` for pairs of different classes, summed, over ``B^2``."""
    f = F.normalize(features.float(), dim=1)
    cos = f @ f.t()
    same = (labels[:, None] == labels[None, :]).float()
    loss = ((1 - cos) * same).sum() + ((cos - alpha).clamp_min(0) * (1 - same)).sum()
    return loss / (f.shape[0] ** 2)


def global_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, alpha: float, ctx: StepContext):
    """:func:`contrastive_loss` of the global batch: this process's rows against every process's
    features (a differentiable all-gather), times the process count, so that the processes' average
    (DDP's) is the one-process value and gradient."""
    n = ctx.num_processes
    if n == 1:
        return contrastive_loss(features, labels, alpha)
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    all_features = torch.cat(dist_fn.all_gather(features.float()), dim=0)
    all_labels = [torch.empty_like(labels) for _ in range(n)]
    dist.all_gather(all_labels, labels)
    all_labels = torch.cat(all_labels)
    mine = F.normalize(features.float(), dim=1)
    f = F.normalize(all_features, dim=1)
    cos = mine @ f.t()
    same = (labels[:, None] == all_labels[None, :]).float()
    loss = ((1 - cos) * same).sum() + ((cos - alpha).clamp_min(0) * (1 - same)).sum()
    return n * loss / (all_features.shape[0] ** 2)


def _recorder(attn: nn.Module, state: dict):
    """A forward hook for ``attn.qkv`` that multiplies the layer's attention probabilities (no gradient)
    into ``state["rollout"]``: one ``(B, heads, N, N)`` product is kept, not one per layer."""
    def record(module, args, out) -> None:
        with torch.no_grad():
            b, n, _ = out.shape
            qkv = out.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probs = ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)
            state["rollout"] = probs if state.get("rollout") is None else probs @ state["rollout"]
    return record


class TransFGModel(MethodModel):
    """A timm ViT whose last layer sees the class token(s) and the selected part tokens.

    Args:
        backbone: A timm VisionTransformer with a class token.
        num_classes: Classes.
        slide_step: Patch embedding stride (overlapping patches when below the patch size).
    """

    new_modules = ("fg_head",)

    def __init__(self, backbone: nn.Module, num_classes: int, *, slide_step: int) -> None:
        if not (hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and hasattr(backbone, "_pos_embed")
                and getattr(backbone, "cls_token", None) is not None):
            raise UserError(f"method transfg needs a timm VisionTransformer with a class token; "
                            f"{type(backbone).__name__} is not one")
        for blk in backbone.blocks:
            if not all(hasattr(blk.attn, a) for a in ("qkv", "num_heads", "scale", "q_norm", "k_norm")):
                raise UserError(f"method transfg needs timm ViT attention (attn.qkv, num_heads, scale); "
                                f"got {type(blk.attn).__name__}")
        overlap_patches(backbone, slide_step)
        super().__init__(backbone, num_classes, features=lambda b, x: [TransFGModel._probe_features(b, x)])
        self.num_features = backbone.embed_dim
        self.fg_head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.last_parts: torch.Tensor | None = None  # (B, heads) token indices of the latest forward

    @staticmethod
    def _probe_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # what prepare_backbone checks for unused parameters: every block and the final norm
        return backbone.norm(backbone.blocks(backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last layer, which sees only the prefix tokens and the selected parts."""
        b = self.backbone
        prefix = b.num_prefix_tokens
        tokens = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
        state: dict = {}  # hooks only for this pass (exports deep-copy the model)
        hooks = [blk.attn.qkv.register_forward_hook(_recorder(blk.attn, state)) for blk in b.blocks[:-1]]
        try:
            if getattr(b, "grad_checkpointing", False) and torch.is_grad_enabled():
                from timm.models import checkpoint_seq

                # the recomputation in backward runs the hooks again on a state no longer read
                tokens = checkpoint_seq(b.blocks[:-1], tokens)
            else:
                for blk in b.blocks[:-1]:
                    tokens = blk(tokens)
        finally:
            for hook in hooks:
                hook.remove()
        parts = select_parts(state["rollout"], prefix)
        self.last_parts = parts.detach()
        index = (parts + prefix)[..., None].expand(-1, -1, tokens.shape[-1])
        selected = torch.cat([tokens[:, :prefix], torch.gather(tokens, 1, index)], dim=1)
        return b.norm(b.blocks[-1](selected))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        cls = x[:, 0]
        return cls if pre_logits else self.fg_head(cls)

    def forward(self, x: torch.Tensor, return_parts: bool = False):
        tokens = self.forward_features(x)
        logits = self.forward_head(tokens)
        return {"logits": logits, "features": tokens[:, 0]} if return_parts else logits


@register_method
class TransFG(Method):
    """TransFG: overlapping patches, part selection by attention rollout into the last layer, and a
    contrastive loss on the class token."""

    name = "transfg"
    options = {"slide_step": 12, "contrastive_weight": 1.0, "alpha": 0.4}
    requires = frozenset({"vit", "hard_labels"})
    architecture = ("slide_step",)
    paper = "He et al., TransFG: A Transformer Architecture for Fine-Grained Recognition, AAAI 2022"

    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        return TransFGModel(backbone, num_classes, slide_step=int(self.opts["slide_step"]))

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        images, labels = batch
        out = model(ctx.inputs(images), return_parts=True)
        ce = self.criterion(out["logits"], labels)
        penalty, terms = self.penalty(out["logits"])
        contrastive = global_contrastive_loss(out["features"], labels, self.opts["alpha"], ctx)
        loss = ce + self.opts["contrastive_weight"] * contrastive + penalty
        terms.update(ce=ce.detach(), contrastive=contrastive.detach())
        return StepOutput(self.add_regularizer(model, loss), out["logits"], terms)

    def draw(self, accelerator, model: nn.Module, images: torch.Tensor, path: Path) -> None:
        """Each test image with the patches its heads selected (every process runs the forward pass)."""
        from fgclf.methods._model import eval_forward, unwrap_to

        net = unwrap_to(model, TransFGModel)
        x, _ = eval_forward(model, images, model)
        parts = net.last_parts.cpu()
        if accelerator is None or accelerator.is_main_process:
            from fgclf.methods._pictures import part_grid

            pe = net.backbone.patch_embed
            step, patch = pe.proj.stride[0], pe.patch_size[0]
            grid_w = pe.grid_size[1]
            boxes = [[(int(i) // grid_w * step, int(i) % grid_w * step, patch) for i in row] for row in parts]
            part_grid(x.float().cpu(), boxes, path, title=f"transfg: the patch each of the {parts.shape[1]} heads selects")
