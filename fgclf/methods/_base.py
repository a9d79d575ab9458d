"""The method interface: what differs between fine-grained approaches, behind one registered object.

A method owns three things (``../shared/DESIGN.md``, "Methods"):

* ``build(backbone, num_classes)``: how the timm backbone is wrapped (pooling heads, attention
  layers); the result still follows timm's model contract, and its ``forward(x)`` in eval mode
  is the method's own inference (e.g. WS-DAN's raw + attention-crop average), so exports,
  ensembles and prediction use it without knowing the method;
* ``training_step(model, batch, ctx)``: any number of forward passes per batch, returning a
  :class:`StepOutput` (the loss to back-propagate, the logits for metrics, named loss terms to
  log); the engine keeps ``accumulate / backward / clip / step`` so DDP, DeepSpeed, mixed
  precision and accumulation stay in one place;
* ``predict(model, images)``: logits for evaluation (test-time flip averaging included).

The loss, mixup/cutmix, the explicit weight penalty, a logit penalty (pairwise confusion,
maximum entropy) and TTA are :class:`StepParts` that a method uses, not loose arguments of ``fit``.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from fgclf.errors import UserError
from fgclf.registry import Registry, unknown_name_message

METHODS: Registry[type["Method"]] = Registry("method")


@dataclass
class StepOutput:
    """What one training step computed.

    Attributes:
        loss: The scalar to back-propagate (every term included).
        logits: Logits of the batch's images (the raw view) for training metrics.
        terms: Named parts of the loss (detached or not) that the engine averages per epoch and
            logs as ``train/<name>``.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a training step may need from the engine.

    Attributes:
        accelerator: The run's ``Accelerator`` (process count, gathers); None outside a run.
        cast: dtype model inputs need (DeepSpeed bf16/fp16), else None.
        seed: The run's seed.
        epoch: Completed epochs (0-based index of the running epoch).
        batch_index: Index of this micro-batch in the epoch.
        global_step: Optimizer updates done before this batch.
        replay: True while SAM takes its second gradient on the same batch: state a step keeps
            (WS-DAN's feature centres) must not be updated again.
    """

    accelerator: Any = None
    cast: Optional[torch.dtype] = None
    seed: int = 0
    epoch: int = 0
    batch_index: int = 0
    global_step: int = 0
    substep: int = 0  # which of the method's optimizer steps on this batch (Method.substeps)
    draws: int = 0  # random draws in this batch so far
    replay: bool = False

    def start_batch(self, batch_index: int, global_step: int) -> None:
        self.batch_index, self.global_step, self.substep, self.draws = batch_index, global_step, 0, 0

    def _generator(self) -> torch.Generator:
        """A generator keyed by (seed, epoch, batch, draw count), the same on every process."""
        import numpy as np

        key = np.random.SeedSequence([int(self.seed), self.epoch, self.batch_index, self.draws]).generate_state(
            1, np.uint64)[0]
        self.draws += 1
        return torch.Generator().manual_seed(int(key) & (2**63 - 1))

    def shared_randperm(self, n: int) -> torch.Tensor:
        """A permutation of ``range(n)`` for the whole global batch: the same on every process."""
        return torch.randperm(n, generator=self._generator())

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.cast is None else images.to(self.cast)

    @property
    def process_index(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def uniform(self, local_batch: int, *shape: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Uniform [0, 1) numbers for this process's ``local_batch`` samples: the process's slice of
        one draw for the whole global batch, from a generator seeded by (seed, epoch, batch, call).

        So a method's random choices (WS-DAN's crop thresholds, attention picks) belong to the
        sample, not to the process: N processes draw what one process draws for the same global
        batch, and a resumed run draws what the uninterrupted one did.
        """
        draw = torch.rand(local_batch * self.num_processes, *shape, generator=self._generator())
        start = local_batch * self.process_index
        return draw[start:start + local_batch].to(device) if device is not None else draw[start:start + local_batch]


@dataclass
class StepParts:
    """The parts of a training step that every method combines with.

    Attributes:
        loss_fn: The classification loss ``loss_fn(logits, target)`` (target: indices or soft).
        mixup: timm Mixup/CutMix callable ``(images, labels) -> (images, soft targets)``, or None.
        regularizer: Explicit weight penalty ``regularizer(model) -> scalar`` (L1/Lp), or None.
        logit_penalty: A penalty on the batch's logits ``logit_penalty(logits) -> scalar``
            (pairwise confusion, maximum entropy), or None; logged as the ``confusion`` term.
        tta_flip: Evaluate on the average of the image's and its mirror image's logits.
        tta: A multi-view test-time augmentation of :mod:`fgclf.tta` (``five_crop``,
            ``ten_crop``, ``multiscale``); ``none``: the flip above or nothing.
    """

    loss_fn: Callable = field(default_factory=nn.CrossEntropyLoss)
    mixup: Optional[Callable] = None
    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None
    logit_penalty: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    tta_flip: bool = False
    tta: str = "none"


class Method:
    """Base class of registered methods; subclasses set :attr:`name`, :attr:`options` and override
    :meth:`build` and, where the step differs from ``plain``'s, :meth:`training_step`.

    Class attributes:
        name: Registry name.
        substeps: Optimizer steps per batch (PMG's one per granularity); the engine calls
            ``training_step`` once per step with ``ctx.substep`` set, and counts the batch as one
            update for the lr schedule and checkpoints.
        options: Option name -> default value; ``create_method`` refuses any other option.
        architecture: The options that shape the model's parameters: continuing from an export of
            the method keeps them (:func:`method_for_run`).
        requires: What the method needs, checked before training: ``"feature_map"`` (a backbone
            whose ``forward_features`` gives a spatial map or patch tokens), ``"hard_labels"``
            (no mixup/cutmix), ``"data_parallel"`` (no pipeline split).
        paper: Citation shown in ``--help`` and the README.
    """

    name: ClassVar[str] = ""
    substeps: int = 1
    options: ClassVar[dict[str, Any]] = {}
    architecture: ClassVar[tuple[str, ...]] = ()  # options that change the parameters' shapes
    requires: ClassVar[frozenset[str]] = frozenset()
    paper: ClassVar[str] = ""

    def __init__(self, parts: Optional[StepParts] = None, **options: Any) -> None:
        self.parts = parts or StepParts()
        self.opts = {**self.options, **options}

    # ------------------------------------------------------------------ building
    def build(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """The model to train from a timm ``backbone`` (with its classifier) and the class count."""
        raise NotImplementedError

    def metadata(self) -> dict:
        """What a checkpoint records so exports rebuild the same model: name and options (as JSON has them)."""
        import json

        return {"name": self.name, "options": json.loads(json.dumps(self.opts))}

    # ------------------------------------------------------------------ training and inference
    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The classification loss on ``logits`` (the run's loss: ce, focal, ..., class weights)."""
        return self.parts.loss_fn(logits.float(), targets)

    def penalty(self, logits: torch.Tensor) -> tuple[torch.Tensor | float, dict]:
        """The logit penalty (Pairwise Confusion, maximum entropy) of the step's prediction and its
        ``confusion`` term; ``(0.0, {})`` without one. Methods add it once per step, on the logits
        they predict with (the raw view: not crops, jigsaws or CAL's effect)."""
        if self.parts.logit_penalty is None:
            return 0.0, {}
        value = self.parts.logit_penalty(logits.float())
        return value, {"confusion": value.detach()}

    def add_regularizer(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the explicit weight penalty (L1/Lp; not the optimizer's weight decay)."""
        return loss if self.parts.regularizer is None else loss + self.parts.regularizer(model)

    def training_step(self, model: nn.Module, batch, ctx: StepContext) -> StepOutput:
        """``plain``'s step: mixup/cutmix, one forward pass, loss (+ logit and weight penalties)."""
        images, labels = batch
        if self.parts.mixup is not None:  # soft targets from then on; every loss accepts them
            images, labels = self.parts.mixup(images, labels)
        logits = model(ctx.inputs(images))
        penalty, terms = self.penalty(logits)
        return StepOutput(self.add_regularizer(model, self.criterion(logits, labels) + penalty), logits, terms)

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits: the model's eval-mode forward (the method's inference), flip-averaged
        with ``tta_flip``, averaged over the views of ``tta`` (:mod:`fgclf.tta`)."""
        if self.parts.tta not in ("none", "flip"):
            from fgclf.tta import tta_logits

            return tta_logits(model, images, self.parts.tta)
        if self.parts.tta_flip:
            from fgclf.data.mixup import tta_flip_logits

            return tta_flip_logits(model, images)
        return model(images)

    # ------------------------------------------------------------------ extra state
    def state_dict(self) -> dict:
        """State a checkpoint must carry besides the model's (none for the built-in methods: their
        state, such as WS-DAN's feature centres, lives in model buffers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state, got {sorted(state)}")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    METHODS.register(cls.name)(cls)
    return cls


def list_methods() -> list[str]:
    """Registered method names."""
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (UserError with suggestions otherwise)."""
    return METHODS.get(name)


def create_method(name: str = "plain", *, parts: Optional[StepParts] = None, **options: Any) -> Method:
    """Build the method ``name`` with its ``options`` (the rest keep the method's defaults).

    Raises:
        UserError: unknown method, or an option the method does not take (naming the methods
            that take it).
    """
    cls = METHODS.get(name)
    for key in options:
        if key not in cls.options:
            owners = [n for n in list_methods() if key in METHODS.get(n).options]
            if owners:
                raise UserError(f"method.{key} is an option of {', '.join(owners)}, not of method {name}")
            close = difflib.get_close_matches(key, list(cls.options), n=1, cutoff=0.5)
            hint = f"; did you mean: {close[0]}?" if close else ""
            takes = ", ".join(cls.options) or "no options"
            raise UserError(f"method {name} got unexpected option '{key}'{hint} (it takes: {takes})")
    return cls(parts=parts, **options)


def method_from_config(config: Any, *, parts: Optional[StepParts] = None) -> Method:
    """A method from a :class:`fgclf.config.MethodConfig`: the options the user set (not None)."""
    values = dataclasses.asdict(config)
    name = values.pop("name")
    if name not in METHODS:
        raise UserError(unknown_name_message("method", name, list_methods()))
    return create_method(name, parts=parts, **{k: v for k, v in values.items() if v is not None})


def method_for_run(config: Any, *, export: Optional[dict] = None) -> Method:
    """The run's method from a :class:`fgclf.config.MethodConfig`; when the run starts from an export
    (``--model.name file:DIR``, whose ``config.json`` is ``export``) of the same method, the export's
    options with only the options set explicitly overriding them, so the recorded options are the
    model's.

    Raises:
        UserError: the export was trained with another method (a plain export may start any
            method), or an explicit option would change the export's architecture.
    """
    stored = (export or {}).get("method") or {"name": "plain", "options": {}}
    if export is None or stored["name"] == "plain":
        return method_from_config(config)
    if stored["name"] != config.name:
        raise UserError(f"the export was trained with method {stored['name']}; continue it with --method.name "
                        f"{stored['name']} (or start from a plain export)")
    values = dataclasses.asdict(config)
    values.pop("name")
    explicit = {k: v for k, v in values.items() if v is not None}
    cls = method_class(config.name)
    merged = {**stored["options"], **explicit}
    changed = [k for k in cls.architecture if k in explicit and _json(explicit[k]) != _json(stored["options"].get(k))]
    if changed:
        raise UserError(f"method.{changed[0]} {explicit[changed[0]]!r} differs from the export's "
                        f"{stored['options'].get(changed[0])!r}; it shapes the model, so it must stay")
    return create_method(config.name, **{k: v for k, v in merged.items() if k in cls.options})


def _json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))
