"""Knowledge distillation: the loss is Hinton et al.'s formula; alpha 0 trains exactly as without a
teacher; a teacher of another architecture and input size distils into the student."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import _run_in_process, last_error_line, train_toy

from fgclf.distill import Teacher, kd_loss


def test_kd_loss_is_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temp in (1.0, 4.0):
        p = (t / temp).softmax(1).double()
        q = (s / temp).softmax(1).double()
        want = temp ** 2 * (p * (p.log() - q.log())).sum(1).mean()
        assert float(kd_loss(s, t, temp)) == pytest.approx(float(want), rel=1e-5)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_sees_the_image_at_its_own_size_and_normalisation():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean((2, 3))
    raw = torch.rand(2, 3, 32, 32)
    student = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    teacher = {"input_size": (3, 48, 48), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    Teacher(Probe(), teacher, student)((raw - 0.5) / 0.25)
    want = F.interpolate(raw, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    want = (want - torch.tensor(teacher["mean"]).view(1, 3, 1, 1)) / torch.tensor(teacher["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], want, atol=1e-5, rtol=1e-5)


def test_runs_alpha_zero_equals_no_teacher_and_a_vit_teacher_distils(toy_root, tmp_path):
    teacher = tmp_path / "teacher"  # another architecture at another input size
    train_toy(toy_root, teacher, "--train.epochs", "2", "--model.name", "test_vit", "--model.kwargs",
              '{"img_size": 48}', "--data.image_size", "48")
    common = ("--train.epochs", "1", "--data.aug.preset", "basic", "--mixup.alpha", "0.2")
    plain, zero, kd = tmp_path / "plain", tmp_path / "zero", tmp_path / "kd"
    train_toy(toy_root, plain, *common)
    train_toy(toy_root, zero, *common, "--distill.teacher", str(teacher), "--distill.alpha", "0")
    np.testing.assert_array_equal(np.load(zero / "predictions.npz")["logits"], np.load(plain / "predictions.npz")["logits"])
    train_toy(toy_root, kd, *common, "--distill.teacher", str(teacher), "--distill.alpha", "0.7")
    history = [json.loads(x) for x in (kd / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["train/kd"] > 0
    assert not np.allclose(np.load(kd / "predictions.npz")["logits"], np.load(plain / "predictions.npz")["logits"])
    # a teacher of other classes is refused before the run directory appears
    other = tmp_path / "other_toy"
    from fgclf.data import generate_toy_cub

    other_root = generate_toy_cub(other, num_classes=3, train_per_class=10, test_per_class=5, image_size=32, seed=1)
    proc = train_toy(other_root, tmp_path / "refused", "--distill.teacher", str(teacher), check=False)
    assert proc.returncode == 2 and "the teacher must have this dataset's 3 classes" in last_error_line(proc)
    assert not (tmp_path / "refused").exists()


def test_the_step_mixes_once_and_weights_the_two_losses():
    """The student and the teacher see the same mixed batch; loss = (1 - a) CE(soft targets) + a T^2 KL."""
    from fgclf.distill import Distillation
    from fgclf.losses import create_loss
    from fgclf.methods import StepContext, StepParts, create_method

    torch.manual_seed(0)
    student, teacher_net = torch.nn.Linear(12, 4), torch.nn.Linear(12, 4)
    data = {"input_size": (3, 2, 2), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    mixed = []

    def mixup(x, y):  # a deterministic "mixup": the batch reversed and averaged, soft targets
        m = 0.5 * (x + x.flip(0))
        mixed.append(m)
        return m, 0.5 * (F.one_hot(y, 4).float() + F.one_hot(y.flip(0), 4).float())
    flat = torch.nn.Sequential(torch.nn.Flatten(), student)
    teacher = Teacher(torch.nn.Sequential(torch.nn.Flatten(), teacher_net), data, data)
    method = create_method("plain", parts=StepParts(loss_fn=create_loss("ce"), mixup=mixup))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    out = Distillation(method, teacher, alpha=0.3, temperature=2.0).training_step(flat, (x, y), StepContext())
    assert len(mixed) == 1 and method.parts.mixup is mixup  # mixed once; the method's own mixup restored
    m, soft = mixed[0], 0.5 * (F.one_hot(y, 4).float() + F.one_hot(y.flip(0), 4).float())
    s, t = flat(m), teacher_net(m.flatten(1))
    want = 0.7 * -(soft * s.log_softmax(1)).sum(1).mean() + 0.3 * kd_loss(s, t, 2.0)
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(out.terms["kd"]) == pytest.approx(float(kd_loss(s, t, 2.0)), rel=1e-5)


def test_a_batch_of_another_size_is_resized_even_with_the_same_normalisation():
    """Progressive resizing hands the teacher smaller batches than the run's size: resized to its own."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return x.mean((2, 3))
    data = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    teacher = Teacher(Probe(), data, data)
    teacher(torch.rand(2, 3, 24, 24))
    teacher(torch.rand(2, 3, 32, 32))
    assert seen == [(32, 32), (32, 32)]


def test_distillation_with_pmgs_step_per_granularity_is_refused(toy_root, tmp_path):
    proc = train_toy(toy_root, tmp_path / "x", "--method.name", "pmg", "--distill.teacher", str(toy_root), check=False)
    assert proc.returncode == 2 and "use --method.steps sum" in last_error_line(proc)
