"""fgclf.gan: shapes, losses against hand formulas, projection term, export round trip, synthetic data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fgclf.config import GanConfig
from fgclf.errors import UserError
from fgclf.gan import (DCGANDiscriminator, DCGANGenerator, GANObjective, build_models, gan_spec, generate_images,
                       load_generator, sample_noise, save_generator, to_uint8)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_generator_and_discriminator_shapes(size):
    g = DCGANGenerator(image_size=size, latent_dim=8, num_classes=3, base_width=8)
    d = DCGANDiscriminator(image_size=size, num_classes=3, base_width=8)
    y = torch.tensor([0, 2])
    x = g(torch.randn(2, 8), y)
    assert x.shape == (2, 3, size, size) and x.abs().max() <= 1
    score, aux = d(x, y)
    assert score.shape == (2,) and aux is None


@pytest.mark.parametrize("size", [8, 24, 100])
def test_image_size_must_be_a_power_of_two(size):
    with pytest.raises(UserError, match="power of two"):
        DCGANGenerator(image_size=size)


def test_projection_discriminator_adds_embedding_dot_features():
    torch.manual_seed(0)
    d = DCGANDiscriminator(image_size=16, num_classes=4, base_width=8).eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 3, 0])
    with torch.no_grad():
        h = d.net(x).sum(dim=(2, 3))
        expected = d.score(h).squeeze(1) + (d.embed(y) * h).sum(1)
        score, _ = d(x, y)
    torch.testing.assert_close(score, expected)
    ac = DCGANDiscriminator(image_size=16, num_classes=4, conditioning="acgan", base_width=8)
    _, aux = ac(x)
    assert aux.shape == (3, 4)


def test_objectives_equal_hand_formulas():
    real, fake = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7, 1.5])
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    r, f = real.numpy().astype(np.float64), fake.numpy().astype(np.float64)
    cases = {"bce": (sp(-r).mean() + sp(f).mean(), sp(-f).mean()),
             "hinge": (np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean(), -f.mean()),
             "lsgan": (0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean(), 0.5 * ((f - 1) ** 2).mean())}
    for name, (d_ref, g_ref) in cases.items():
        obj = GANObjective(name)
        assert obj.discriminator(real, fake)["loss"].item() == pytest.approx(d_ref, rel=1e-6), name
        assert obj.generator(fake)["loss"].item() == pytest.approx(g_ref, rel=1e-6), name
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 0])
    obj = GANObjective("hinge", aux_weight=0.5)
    out = obj.discriminator(real, fake, aux_real=logits, labels=labels)
    assert out["loss"].item() == pytest.approx(cases["hinge"][0] + 0.5 * F.cross_entropy(logits, labels).item(),
                                               rel=1e-6)
    with pytest.raises(UserError, match="unknown GAN loss"):
        GANObjective("wgan-gpx")


@pytest.mark.parametrize("arch", ["cdcgan", "dcgan", "diffusion"])
def test_export_reloads_to_identical_samples(tmp_path, arch):
    torch.manual_seed(0)
    spec = gan_spec(GanConfig(arch=arch, image_size=16, base_width=8, latent_dim=8, sample_steps=3), num_classes=3)
    g, d = build_models(spec)
    save_generator(tmp_path / "gen", g, d, spec=spec, class_names=["a", "b", "c"], extra={"epoch": 1})
    again, meta = load_generator(tmp_path / "gen")
    assert meta["spec"] == spec and meta["class_names"] == ["a", "b", "c"] and meta["epoch"] == 1
    noise = sample_noise(spec, 6, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if spec["num_classes"] else None
    a = to_uint8(generate_images(g, spec, noise, labels, batch_size=4))
    b = to_uint8(generate_images(again, spec, noise, labels, batch_size=6))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b)
    assert torch.equal(sample_noise(spec, 6, seed=3), noise) and not torch.equal(sample_noise(spec, 6, seed=4), noise)
    if d is not None:
        _, d2, _ = load_generator(tmp_path / "gen", discriminator=True)
        x = torch.randn(2, 3, 16, 16)
        y = torch.tensor([0, 1]) if spec["num_classes"] else None
        d.eval()
        torch.testing.assert_close(d2(x, y)[0], d(x, y)[0])


def test_load_generator_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_generator(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a generator export"):
        load_generator(tmp_path / "x")


# ----------------------------------------------------------------------------- synthetic data
def _records(tmp_path):
    from fgclf.data.datasets import Records

    names = ["a", "b"]
    ids = [f"r{i}" for i in range(8)]
    return Records([str(tmp_path / f"{i}.png") for i in ids], [0, 0, 0, 1, 1, 0, 1, 1], ids,
                   ["train", "train", "train", "train", "train", "val", "test", "test"], names)


def _synthetic_dir(tmp_path, counts: dict[str, int], train_ids):
    from PIL import Image

    root = tmp_path / "synth"
    lines = []
    for label, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for k in range(n):
            rel = f"{name}/{label:03d}_{k:05d}.png"
            Image.new("RGB", (8, 8), (k, label, 0)).save(root / rel)
            lines.append(json.dumps({"file": rel, "label": label, "class_name": name}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "generator.json").write_text(json.dumps({"train_image_ids": train_ids}))
    return root


def test_synthetic_images_join_train_only_in_the_asked_amounts(tmp_path):
    from fgclf.data.synthetic import add_synthetic, check_generator_split, load_synthetic, select_synthetic

    records = _records(tmp_path)
    root = _synthetic_dir(tmp_path, {"a": 5, "b": 1}, ["r0", "r1", "r3"])
    check_generator_split(root, records)
    synth = load_synthetic(root, class_names=records.class_names)
    assert len(synth) == 6 and set(synth.splits) == {"train"}
    # real train: a x3, b x2; ratio 1 wants 3 and 2, the folder has only 1 b
    chosen, counts = select_synthetic(synth, real_train_labels=[0, 0, 0, 1, 1], num_classes=2, ratio=1.0, seed=0)
    assert counts == {0: (3, 3), 1: (2, 1)} and sorted(chosen.labels) == [0, 0, 0, 1]
    again, _ = select_synthetic(synth, real_train_labels=[0, 0, 0, 1, 1], num_classes=2, ratio=1.0, seed=0)
    assert again.image_ids == chosen.image_ids  # the seed fixes the choice
    fixed, counts = select_synthetic(synth, real_train_labels=[0, 0, 0, 1, 1], num_classes=2, per_class=2)
    assert counts == {0: (2, 2), 1: (2, 1)}
    merged = add_synthetic(records, chosen)
    for split in ("val", "test"):  # untouched
        assert merged.split(split).image_ids == records.split(split).image_ids
    assert merged.split("train").image_ids == records.split("train").image_ids + chosen.image_ids
    only = add_synthetic(records, chosen, only=True)
    assert only.split("train").image_ids == chosen.image_ids and only.split("test").image_ids == ["r6", "r7"]


def test_generator_trained_on_val_or_test_images_is_refused(tmp_path):
    from fgclf.data.synthetic import check_generator_split, load_synthetic

    records = _records(tmp_path)
    root = _synthetic_dir(tmp_path, {"a": 1}, ["r0", "r6"])  # r6 is a test image here
    with pytest.raises(UserError, match="not in this run's train split .*test"):
        check_generator_split(root, records)
    (root / "manifest.jsonl").write_text(json.dumps({"file": "a/000_00000.png", "label": 0, "class_name": "zebra"}))
    with pytest.raises(UserError, match="class 'zebra'"):
        load_synthetic(root, class_names=records.class_names)


def test_filter_classifier_that_saw_test_images_is_refused(tmp_path):
    from fgclf.data.synthetic import check_generator_split

    records = _records(tmp_path)
    root = _synthetic_dir(tmp_path, {"a": 1}, ["r0", "r1"])
    info = json.loads((root / "generator.json").read_text())
    info.update(classifier="/x", classifier_splits={"train": ["r0", "r2"], "val": ["r5"]})
    (root / "generator.json").write_text(json.dumps(info))
    check_generator_split(root, records)  # trained on train images, validated on a val image: fine
    info["classifier_splits"]["val"] = ["r5", "r6"]  # r6 is a test image of this run
    (root / "generator.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="filter classifier .* chose its checkpoint on 1 image"):
        check_generator_split(root, records)
    info["classifier_splits"] = None
    (root / "generator.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="splits are not recorded"):
        check_generator_split(root, records)
