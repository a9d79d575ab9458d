"""Hugging Face transformers vision models behind fgclf's model contract: ``--model.name hf:<repo or folder>``.

``hf:google/vit-base-patch16-224-in21k``, ``hf:facebook/dinov2-base``, ``hf:openai/clip-vit-base-patch16``,
``hf:microsoft/swin-base-patch4-window7-224`` or ``hf:<a folder written by save_pretrained>`` become an
:class:`HFVisionModel`, a module with timm's interface, so that strategies, PEFT, feature extraction,
checkpoints, export and prediction treat it like a timm model:

- ``forward_features(x)``: the transformer's last hidden states ``(B, tokens, D)``;
- ``forward_head(tokens, pre_logits=True)``: the pooled features; without ``pre_logits`` the logits of
  ``classifier``, an ``nn.Linear`` (``pretrained_cfg["classifier"] = "classifier"``: the head learning
  rate, linear probing and PEFT's ``modules_to_save`` find it);
- ``group_matcher``: the embeddings (stem), each encoder layer (Swin: each stage, and each block with
  ``coarse=False``), the final norm: ``partial:N`` freezes the embeddings and the first N layers, and
  ``optim.layer_decay`` decays by layer;
- ``pretrained_cfg``: the input size, mean, std, crop fraction and interpolation of the repo's image
  processor (``preprocessor_config.json``), which fgclf's transforms then follow.

Families (the config's ``model_type``) and their pooling, as transformers' own classifiers pool:

==========  ===============================================  ====================
family      classifier model (weights, head)                 pooling (default)
==========  ===============================================  ====================
vit         ``ViTForImageClassification``                    ``cls``
dinov2      ``Dinov2ForImageClassification``                 ``cls+mean``
swin        ``SwinForImageClassification``                   ``mean``
clip        ``CLIPVisionModel`` (no classifier) + a Linear   ``cls`` (post-norm CLS)
==========  ===============================================  ====================

``pooling`` (``--model.kwargs '{"pooling": "mean"}'``): ``cls``, ``mean`` (the patch tokens) or
``cls+mean`` (both, concatenated) for the ViT-like families; a pooling other than the classifier
model's own gets a new head. A repo without a classification head (DINOv2, most ViT/Swin backbones)
gets a new one of ``num_classes`` outputs (``ignore_mismatched_sizes``), as does one with another
class count. Other input sizes than the config's are taken (position embeddings interpolated).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from fgclf.errors import UserError, message_line

HF_PREFIX = "hf:"
FAMILIES = ("vit", "dinov2", "swin", "clip")
_DEFAULT_POOLING = {"vit": "cls", "dinov2": "cls+mean", "swin": "mean", "clip": "cls"}
_BODY_ATTR = {"vit": "vit", "dinov2": "dinov2", "swin": "swin"}
# body parameter names: stem, blocks (coarse / fine), final norm
_GROUPS = {
    "vit": (r"^body\.embeddings", [r"^body\.layers\.(\d+)"], [r"^body\.layers\.(\d+)"], r"^body\.layernorm"),
    "dinov2": (r"^body\.embeddings", [r"^body\.encoder\.layer\.(\d+)"], [r"^body\.encoder\.layer\.(\d+)"],
               r"^body\.layernorm"),
    "clip": (r"^body\.(?:embeddings|pre_layrnorm)", [r"^body\.encoder\.layers\.(\d+)"],
             [r"^body\.encoder\.layers\.(\d+)"], r"^body\.post_layernorm"),
    # Swin's patch merging ends its stage (transformers runs it after the stage's blocks): it joins the last block
    "swin": (r"^body\.embeddings", [r"^body\.encoder\.layers\.(\d+)"],
             [r"^body\.encoder\.layers\.(\d+)\.blocks\.(\d+)",
              (r"^body\.encoder\.layers\.(\d+)\.downsample", (99999,))], r"^body\.layernorm"),
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _family(config) -> str:
    kind = getattr(config, "model_type", None)
    kind = "clip" if kind in ("clip", "clip_vision_model") else kind
    if kind not in FAMILIES:
        raise UserError(f"hf: models of type {kind!r} are not supported yet; supported: {', '.join(FAMILIES)} "
                        "(ViT, DINOv2, Swin, the CLIP vision tower)")
    return kind


class HFVisionModel(nn.Module):
    """A transformers vision backbone with timm's interface (see the module docstring)."""

    def __init__(self, body: nn.Module, family: str, num_classes: int, *, pooling: Optional[str] = None,
                 classifier: Optional[nn.Module] = None, data_config: Optional[dict] = None, source: str = "") -> None:
        super().__init__()
        pooling = pooling or _DEFAULT_POOLING[family]
        if pooling not in ("cls", "mean", "cls+mean"):
            raise UserError(f"hf: pooling must be cls, mean or cls+mean, got {pooling!r}")
        if family == "swin" and pooling != "mean":
            raise UserError("hf: a Swin model has no CLS token; its pooling is mean")
        self.body, self.family, self.pooling = body, family, pooling
        width = body.config.hidden_size if family != "swin" else body.num_features
        self.num_features = 2 * width if pooling == "cls+mean" else width
        self.num_classes = num_classes
        fits = classifier is not None and isinstance(classifier, nn.Linear) and \
            classifier.in_features == self.num_features and classifier.out_features == num_classes
        self.classifier = classifier if fits else self._head(num_classes)
        self.new_head = not fits
        data_config = dict(data_config or {})
        size = getattr(body.config, "image_size", None)
        if "input_size" not in data_config and isinstance(size, int):  # no image processor: the config's size
            data_config["input_size"] = (3, size, size)
        self.pretrained_cfg = {"classifier": "classifier", "num_classes": num_classes, "architecture": source,
                               **data_config}
        if family == "dinov2":  # the masked-image-modelling token never takes part in classification: frozen,
            body.embeddings.mask_token.requires_grad_(False)  # or DDP would wait for its gradient

    def _head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.family in ("vit", "clip") else {}
        tokens = self.body(pixel_values=x, **kwargs).last_hidden_state
        if self.family == "clip":  # CLIP normalises only the CLS token it pools; here every token (as timm's CLIP
            tokens = self.body.post_layernorm(tokens)  # ViTs do), so the norm always trains and maps are normed
        return tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.family == "swin":
            pooled = x.mean(1)
        else:
            cls = x[:, 0]  # CLIP: its pooler_output (post_layernorm of the CLS token)
            patches = x[:, 1:].mean(1)
            pooled = {"cls": cls, "mean": patches}.get(self.pooling)
            if pooled is None:
                pooled = torch.cat([cls, patches], dim=1)
        return pooled if pre_logits else self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in ``forward_features``' output (the CLS token; Swin has none)."""
        return 0 if self.family == "swin" else 1

    def feature_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The (rows, columns) the patch tokens of an ``image_hw`` input lie on (fine-grained methods lay
        them out as a feature map: ``fgclf.methods._model.to_feature_map``)."""
        c = self.body.config
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        h, w = -(-image_hw[0] // patch), -(-image_hw[1] // patch)
        if self.family == "swin":  # each stage after the first halves the grid (patch merging)
            for _ in range(len(c.depths) - 1):
                h, w = -(-h // 2), -(-w // 2)
        elif self.family in ("vit", "clip", "dinov2"):
            h, w = image_hw[0] // patch, image_hw[1] // patch
        return h, w

    def cam_layer(self) -> nn.Module:
        """The layer class-activation maps are taken at: the last block's first norm (its input tokens, as
        fgclf takes a timm ViT's ``blocks[-1].norm1``)."""
        body = self.body
        if self.family == "vit":
            return body.layers[-1].layernorm_before
        if self.family == "dinov2":
            return body.encoder.layer[-1].norm1
        if self.family == "clip":
            return body.encoder.layers[-1].layer_norm1
        return body.encoder.layers[-1].blocks[-1].layernorm_before  # swin

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        self.num_classes = num_classes
        self.classifier = self._head(num_classes)
        self.pretrained_cfg["num_classes"] = num_classes

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter grouping (``timm.models.group_parameters``)."""
        stem, blocks_coarse, blocks_fine, norm = _GROUPS[self.family]
        blocks = blocks_coarse if coarse else blocks_fine
        return {"stem": stem, "blocks": [*(b if isinstance(b, tuple) else (b, None) for b in blocks),
                                         (norm, (99999,))]}

    def no_weight_decay(self) -> set:
        """Tokens and position tables, kept out of weight decay as timm keeps a ViT's."""
        keys = ("cls_token", "mask_token", "position_embedding", "class_embedding", "relative_position_bias_table")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.body.gradient_checkpointing_enable()
        else:
            self.body.gradient_checkpointing_disable()

    def export_kwargs(self) -> dict:
        """What ``create_model`` needs to rebuild this architecture without the hub or the folder."""
        return {"hf_config": self.body.config.to_dict(), "pooling": self.pooling,
                "data_config": {k: v for k, v in self.pretrained_cfg.items()
                                if k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")}}


def data_config_from_processor(source: str, trust_remote_code: bool = False) -> dict:
    """timm-style data config from the repo's image processor (an empty dict when it has none)."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no preprocessor_config.json: timm's defaults then, said out loud
        print(f"warning: hf:{source} has no image processor (preprocessor_config.json): its input is resized to "
              "the config's image size with ImageNet mean/std; pass --data.image_size or check the model card",
              flush=True)
        return {}
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)

    def field(d, key):
        if d is None:
            return None
        try:
            return d[key]
        except (KeyError, TypeError):
            return getattr(d, key, None)
    out: dict = {}
    if mean is not None and std is not None:
        out.update(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    short = field(size, "shortest_edge")
    if getattr(proc, "do_center_crop", False) and crop is not None and short:
        h, w = field(crop, "height"), field(crop, "width")
        out.update(input_size=(3, int(h), int(w)), crop_pct=min(int(h), int(w)) / int(short))
    elif field(size, "height"):  # resized to exactly height x width (squashed, not cropped)
        out.update(input_size=(3, int(field(size, "height")), int(field(size, "width"))), crop_pct=1.0,
                   crop_mode="squash")
    elif short:
        out.update(input_size=(3, int(short), int(short)), crop_pct=1.0)
    resample = getattr(proc, "resample", None)
    if resample is not None:
        out["interpolation"] = _RESAMPLE.get(int(resample), "bicubic")
    return out


def create_hf_model(spec: str, num_classes: Optional[int], pretrained: bool, trust_remote_code: bool,
                    kwargs: dict[str, Any]) -> HFVisionModel:
    """``hf:<repo or folder>`` (see the module docstring); ``pretrained`` False builds from the config only
    (``hf_config`` in ``kwargs``: an export's stored config, so no hub or folder is needed)."""
    import transformers
    from transformers import AutoConfig

    from fgclf.models._factory import _download_errors

    kwargs = dict(kwargs)
    pooling = kwargs.pop("pooling", None)
    stored, data_config = kwargs.pop("hf_config", None), kwargs.pop("data_config", None)
    for key in ("drop_rate", "drop_path_rate", "attn_drop_rate"):
        if key in kwargs:
            raise UserError(f"hf: models take their dropout from their config; model.{key} is a timm option")
    if kwargs:
        raise UserError(f"hf:{spec}: unknown model option(s) {', '.join(sorted(kwargs))} (known: pooling)")
    if int(transformers.__version__.split(".")[0]) < 5:
        raise UserError(f"hf: models need transformers 5 or newer (its ViT/CLIP module layout); this is "
                        f"{transformers.__version__}: pip install 'fgclf[hf]'")
    try:
        if stored is not None:
            config = AutoConfig.for_model(**copy.deepcopy(stored))
        else:
            try:
                config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
            except ValueError as e:  # an unknown model type, or a repo whose code must be trusted
                raise UserError(f"hf:{spec}: {message_line(e)} (a repo with its own code needs "
                                "--model.trust_remote_code true)") from None
        family = _family(config)
        if data_config is None:
            data_config = data_config_from_processor(spec, trust_remote_code) if stored is None else {}
        classifier, head_loaded = None, False
        if family == "clip":
            vision = config.vision_config if config.model_type == "clip" else config
            if pretrained and stored is None:
                tower = transformers.CLIPVisionModel.from_pretrained(spec, trust_remote_code=trust_remote_code)
            else:
                tower = transformers.CLIPVisionModel(vision)
            body = tower  # embeddings, pre_layrnorm, encoder.layers, post_layernorm (transformers 5)
        else:
            cls = transformers.AutoModelForImageClassification
            if num_classes:
                config.num_labels = num_classes
                config.id2label = {i: str(i) for i in range(num_classes)}
                config.label2id = {str(i): i for i in range(num_classes)}
            if pretrained and stored is None:
                full, info = cls.from_pretrained(spec, config=config, ignore_mismatched_sizes=True,
                                                 trust_remote_code=trust_remote_code, output_loading_info=True)
                fresh = [k for k in (*info.get("missing_keys", ()), *info.get("mismatched_keys", ()))]
                head_loaded = not any(str(k[0] if isinstance(k, tuple) else k).startswith("classifier")
                                      for k in fresh)
            else:
                full = cls.from_config(config)
            body, classifier = getattr(full, _BODY_ATTR[family]), full.classifier
    except _download_errors() as e:
        raise UserError(f"could not load 'hf:{spec}' (offline, or no such repo or folder?): "
                        f"{message_line(e)}") from None
    n = num_classes if num_classes is not None else int(getattr(config, "num_labels", 0) or 0)
    model = HFVisionModel(body, family, n, pooling=pooling, classifier=classifier, data_config=data_config,
                          source=f"{HF_PREFIX}{spec}")
    model.head_loaded = head_loaded and not model.new_head  # transfer.head_is_new reads it
    return model


__all__ = ["FAMILIES", "HF_PREFIX", "HFVisionModel", "create_hf_model", "data_config_from_processor"]
