"""Knowledge distillation from a trained teacher (``--distill.teacher``).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015): the student
learns from the teacher's softened probabilities as well as the labels,

    loss = (1 - alpha) * L_method + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

with ``t``/``s`` the teacher's/student's logits on the same augmented batch (after mixup/cutmix),
the KL averaged over the batch, and ``T^2`` keeping the soft term's gradients at the hard term's
scale as ``T`` changes. ``L_method`` is the method's whole loss (cross-entropy, or WS-DAN's,
TransFG's..., with their penalties); the KL is on the method's prediction (``StepOutput.logits``).

The teacher is any fgclf model folder (a run directory, a checkpoint, an export, an adapter
export) trained on the same classes, of any architecture and input size: the student's batch is
un-normalised with the student's mean/std, resized to the teacher's input size and normalised
with the teacher's, then the teacher runs in eval mode without gradients (its method's inference).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgclf.errors import UserError
from fgclf.methods import Method, StepOutput


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class Teacher(nn.Module):
    """A trained model that takes the student's normalised batch (see the module doc)."""

    def __init__(self, model: nn.Module, teacher_data: dict, student_data: dict) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = tuple(teacher_data.get("input_size") or (3, 224, 224))[1:]
        for name, data in (("t", teacher_data), ("s", student_data)):
            self.register_buffer(f"{name}_mean", torch.tensor(data.get("mean", (0.5,) * 3)).view(1, 3, 1, 1))
            self.register_buffer(f"{name}_std", torch.tensor(data.get("std", (0.5,) * 3)).view(1, 3, 1, 1))
        self.same_norm = torch.equal(self.t_mean, self.s_mean) and torch.equal(self.t_std, self.s_std)

    def train(self, mode: bool = True):  # always in eval mode (BatchNorm statistics, dropout)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        resize = tuple(x.shape[-2:]) != tuple(self.size)  # another input size (or a progressive-resizing epoch)
        if resize or not self.same_norm:
            x = x * self.s_std + self.s_mean
            if resize:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            x = (x - self.t_mean) / self.t_std
        return self.model(x).float()


def load_teacher(path: str, *, class_names: Sequence[str], student_data: dict, device) -> Teacher:
    """The teacher at ``path`` (any ``--model`` of predict.py), checked to have the student's classes."""
    from fgclf.predict import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    names = checkpoint.config.get("class_names")
    if int(checkpoint.config["num_classes"]) != len(class_names) or (names and list(map(str, names)) !=
                                                                     list(map(str, class_names))):
        raise UserError(f"--distill.teacher {path} was trained on {checkpoint.config['num_classes']} other classes; "
                        f"the teacher must have this dataset's {len(class_names)} classes in the same order")
    return Teacher(checkpoint.load_model(), checkpoint.config.get("data_config") or {}, student_data).to(device)


class Distillation(Method):
    """The run's method with the teacher's soft targets added to its loss (a wrapper for ``fit``:
    the training step changes; prediction, substeps and state are the method's)."""

    def __init__(self, method: Method, teacher: Teacher, *, alpha: float, temperature: float) -> None:
        super().__init__(parts=method.parts)
        self.inner, self.teacher, self.alpha, self.temperature = method, teacher, alpha, temperature
        self.name, self.substeps = method.name, method.substeps

    def training_step(self, model: nn.Module, batch, ctx) -> StepOutput:
        images, labels = batch
        mixup = self.inner.parts.mixup
        if mixup is not None:  # mixed here, so the teacher sees the same images as the student
            images, labels = mixup(images, labels)
        self.inner.parts.mixup = None
        try:
            out = self.inner.training_step(model, (images, labels), ctx)
        finally:
            self.inner.parts.mixup = mixup
        soft = kd_loss(out.logits, self.teacher(images), self.temperature)
        loss = (1 - self.alpha) * out.loss + self.alpha * soft
        return StepOutput(loss, out.logits, {**out.terms, "kd": soft.detach()})

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.inner.predict(model, images)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


__all__ = ["Distillation", "Teacher", "kd_loss", "load_teacher"]
