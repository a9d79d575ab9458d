"""Augmentation presets and parts, mixup/cutmix and flip TTA, checked on tiny images by hand."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fgclf.data.mixup import create_mixup, tta_flip_logits
from fgclf.data.transforms import (AugmentConfig, create_transform, list_augmentations,
                                   list_auto_augment_policies, resolve_augment, resolve_input_config)
from fgclf.errors import UserError

H, W = 16, 24  # non-square so a swapped height/width shows
MEAN, STD = (0.2, 0.5, 0.7), (0.25, 0.5, 2.0)
CFG = dict(input_size=(3, H, W), mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear")
# parts that leave a W x H image untouched: whole-image crop at its own aspect ratio, no flip/jitter
NEUTRAL = dict(scale=(1.0, 1.0), ratio=(W / H, W / H), hflip=0.0, color_jitter=0.0)
TRAIN_PRESETS = [p for p in list_augmentations() if p != "none"]


def _img(kind: str = "noise", size: tuple[int, int] = (W, H), seed: int = 0) -> Image.Image:
    w, h = size
    if kind == "noise":
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == "halves":  # left white, right black: asymmetric under flips and rotations
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, : w // 2] = 255
    elif kind == "checker":
        arr = ((np.indices((h, w)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    elif kind == "hgradient":
        arr = np.linspace(0, 255, w).round().astype(np.uint8)[None, :, None].repeat(h, 0).repeat(3, -1)
    else:  # constant colour given as "r,g,b"
        arr = np.full((h, w, 3), [int(c) for c in kind.split(",")], np.uint8)
    return Image.fromarray(arr)


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """Hand-computed normalised value per channel, shaped (3, 1, 1)."""
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD)]).view(3, 1, 1)


def _run(tf, img: Image.Image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return tf(img)


def test_list_augmentations_has_presets_and_policies():
    assert {"none", "basic", "strong", "randaugment", "trivialaugment", "autoaugment", "augmix"} <= set(
        list_augmentations())
    assert {"rand", "augmix", "original", "trivialaugment", "autoaugment"} <= set(list_auto_augment_policies())


def test_eval_transform_normalises_constant_colour_by_hand():
    rgb = (51, 128, 204)
    cfg = dict(CFG, crop_pct=0.875)  # resize up + centre crop: a constant image stays constant
    out = create_transform(cfg, is_training=False)(_img("51,128,204", size=(40, 30)))
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised(rgb).expand(3, H, W), atol=1e-6, rtol=0)


def test_train_transform_with_neutral_parts_normalises_by_hand():
    out = _run(create_transform(CFG, is_training=True, aug="basic", **NEUTRAL), _img("51,128,204"), 0)
    torch.testing.assert_close(out, _normalised((51, 128, 204)).expand(3, H, W), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", list_augmentations())
def test_preset_size_and_normalisation_range(preset):
    out = _run(create_transform(CFG, is_training=True, aug=preset), _img("noise", size=(40, 30)), 0)
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    pixels = out * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    # un-normalised with the configured mean/std the image is back in [0, 1] (std=2.0 on the blue
    # channel makes an unnormalised or ImageNet-normalised output fall outside) and keeps contrast
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert (pixels.amax(dim=(1, 2)) - pixels.amin(dim=(1, 2))).min() > 0.3


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_train_presets_random_but_reproducible_under_torch_seed(preset):
    tf = create_transform(CFG, is_training=True, aug=preset)
    img = _img("noise", size=(40, 30))
    random.seed(1), np.random.seed(1)
    first = _run(tf, img, 123)
    random.seed(2), np.random.seed(2)  # python/numpy state must not matter
    torch.testing.assert_close(_run(tf, img, 123), first, atol=0, rtol=0)
    outs = [_run(tf, img, s) for s in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_none_preset_equals_eval_transform():
    cfg = dict(CFG, crop_pct=0.875)
    img = _img("noise", size=(40, 30))
    ref = create_transform(cfg, is_training=False)(img)
    assert torch.equal(_run(create_transform(cfg, is_training=True, aug="none"), img, 0), ref)
    assert torch.equal(_run(create_transform(cfg, is_training=True, aug=AugmentConfig(preset="none")), img, 1), ref)


def test_hflip_part():
    img = _img("halves")
    ref = create_transform(CFG, is_training=False)(img)
    flipped = _run(create_transform(CFG, is_training=True, **{**NEUTRAL, "hflip": 1.0}), img, 0)
    assert torch.equal(flipped, ref.flip(-1)) and not torch.equal(flipped, ref)
    assert torch.equal(_run(create_transform(CFG, is_training=True, **NEUTRAL), img, 0), ref)


def test_rotation_part_tilts_a_vertical_edge():
    img = _img("halves")

    def top_bottom_gaps(rotation: float) -> list[float]:
        tf = create_transform(CFG, is_training=True, **NEUTRAL, rotation=rotation)
        outs = [_run(tf, img, s)[0] for s in range(8)]  # red channel
        return [float((o[: H // 2].mean() - o[H // 2:].mean()).abs()) for o in outs]

    assert max(top_bottom_gaps(0.0)) == 0.0  # left/right split: top and bottom halves alike
    assert max(top_bottom_gaps(90.0)) > 0.5


def test_gaussian_noise_part_std_on_constant_image():
    sigma, rgb = 0.05, (128, 128, 128)
    tf = create_transform(CFG, is_training=True, **NEUTRAL, gaussian_noise=sigma)
    out = _run(tf, _img("128,128,128", size=(W, H)), 0)
    expected_std = torch.tensor([sigma / s for s in STD])
    got_std = out.flatten(1).std(dim=1)
    torch.testing.assert_close(got_std, expected_std, rtol=0.15, atol=0)
    torch.testing.assert_close(out.flatten(1).mean(1), _normalised(rgb).flatten(), atol=3 * max(expected_std), rtol=0)
    quiet = _run(create_transform(CFG, is_training=True, **NEUTRAL), _img("128,128,128"), 0)
    assert quiet.flatten(1).std(dim=1).max() == 0


def test_gaussian_blur_part_smooths_a_checkerboard():
    img = _img("checker")
    ref = create_transform(CFG, is_training=False)(img)
    sharp = [_run(create_transform(CFG, is_training=True, **NEUTRAL, gaussian_blur=0.0), img, s) for s in range(6)]
    assert all(torch.equal(o, ref) for o in sharp)
    blurred = [_run(create_transform(CFG, is_training=True, **NEUTRAL, gaussian_blur=1.0), img, s) for s in range(6)]
    stds = [float(o.std()) for o in blurred]
    assert max(stds) <= float(ref.std()) + 1e-6 and min(stds) < 0.5 * float(ref.std())


def test_random_erasing_part_erases_one_rectangle_to_the_mean():
    rgb = (10, 240, 30)
    value = _normalised(rgb).expand(3, H, W)
    tf = create_transform(CFG, is_training=True, **NEUTRAL, random_erasing=1.0)
    for seed in range(5):
        out = _run(tf, _img("10,240,30"), seed)
        erased = (out == 0).all(0)
        frac = float(erased.float().mean())
        assert 0.01 < frac < 0.4
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a filled rectangle
        torch.testing.assert_close(out[:, ~erased], value[:, ~erased], atol=1e-6, rtol=0)
    kept = _run(create_transform(CFG, is_training=True, **NEUTRAL, random_erasing=0.0), _img("10,240,30"), 0)
    assert not (kept == 0).all(0).any()


def test_color_jitter_part_shifts_colour():
    img, rgb = _img("90,120,150"), (90, 120, 150)
    outs = [_run(create_transform(CFG, is_training=True, **{**NEUTRAL, "color_jitter": 0.4}), img, s)
            for s in range(4)]
    assert all(float((o - _normalised(rgb)).abs().max()) > 0.01 for o in outs)
    still = _run(create_transform(CFG, is_training=True, **NEUTRAL), img, 0)
    torch.testing.assert_close(still, _normalised(rgb).expand(3, H, W), atol=1e-6, rtol=0)


def test_scale_part_zooms_in():
    img = _img("hgradient")

    def row_span(scale):
        tf = create_transform(CFG, is_training=True, **{**NEUTRAL, "scale": scale})
        return float(_run(tf, img, 0)[0, H // 2].max() - _run(tf, img, 0)[0, H // 2].min())

    full = row_span((1.0, 1.0))
    assert full > 3.0  # 0..1 over std 0.25
    assert row_span((0.1, 0.1)) < 0.45 * full  # side ~ sqrt(0.1) = 0.32 of the width


def test_preset_composes_with_overrides_and_config_object():
    cfg = resolve_augment("strong", rotation=15)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.random_erasing == 0.25
    assert cfg.rotation == 15 and cfg.scale == (0.35, 1.0) and cfg.hflip == 0.5
    assert resolve_augment(AugmentConfig(preset="strong", rotation=15)) == cfg
    assert resolve_augment(AugmentConfig(), hflip=0.0).hflip == 0.0
    assert resolve_augment() == resolve_augment("basic") and resolve_augment().color_jitter == 0.2
    assert resolve_augment("basic", auto_augment="").auto_augment == "none"
    img = _img("noise", size=(40, 30))
    a = _run(create_transform(CFG, is_training=True, aug="strong", rotation=15), img, 5)
    b = _run(create_transform(CFG, is_training=True, aug=AugmentConfig(preset="strong", rotation=15)), img, 5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original-mstd0.5", "v0",
                                    "trivialaugment", "autoaugment"])
def test_auto_augment_policies_build_and_run(policy):
    tf = create_transform(CFG, is_training=True, auto_augment=policy)
    assert _run(tf, _img("noise", size=(40, 30)), 0).shape == (3, H, W)


@pytest.mark.parametrize("aug,overrides,match", [
    ("basik", {}, "did you mean: basic"),
    ("basic", {"rotaton": 10}, "did you mean: rotation"),
    ("none", {"hflip": 0.5}, "eval transform"),
    ("basic", {"hflip": 1.5}, "hflip"),
    ("basic", {"scale": (0.8, 0.2)}, "scale"),
    ("basic", {"gaussian_noise": -0.1}, "gaussian_noise"),
    ("basic", {"auto_augment": "randd-m9"}, "did you mean: rand"),
    ("basic", {"auto_augment": "trivialaugment-m3"}, "takes no options"),
])
def test_bad_augmentation_is_user_error(aug, overrides, match):
    with pytest.raises(UserError, match=match):
        create_transform(CFG, is_training=True, aug=aug, **overrides)


def test_existing_callers_and_resolve_input_config():
    cfg = resolve_input_config(CFG, image_size=20)
    assert cfg["input_size"] == (3, 20, 20) and CFG["input_size"] == (3, H, W)
    img = _img("noise", size=(40, 30))
    assert create_transform(cfg, is_training=True, aug="basic")(img).shape == (3, 20, 20)
    assert create_transform(cfg, is_training=False)(img).shape == (3, 20, 20)
    assert create_transform(cfg, is_training=False, aug="basik")(img).shape == (3, 20, 20)  # eval ignores aug


# ---------------------------------------------------------------- mixup / cutmix


def _batch(n: int, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, c, (n,), generator=g)


def _onehot(labels, c, smoothing=0.0):
    return torch.nn.functional.one_hot(labels, c).float() * (1 - smoothing) + smoothing / c


def test_create_mixup_none_when_off_and_validates():
    assert create_mixup(num_classes=5) is None
    with pytest.raises(UserError):
        create_mixup(mixup_alpha=-1.0, num_classes=5)
    with pytest.raises(UserError):
        create_mixup(mixup_alpha=1.0, prob=2.0, num_classes=5)


@pytest.mark.parametrize("n", [4, 3])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_images_and_soft_targets_by_hand(n, smoothing):
    mix = create_mixup(mixup_alpha=1.0, label_smoothing=smoothing, num_classes=5)
    x, y = _batch(n)
    torch.manual_seed(0)
    mixed, targets = mix(x.clone(), y)
    lam = mix.last_lam
    assert 0 < lam < 1 and targets.shape == (n, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(n))
    expected = lam * _onehot(y, 5, smoothing) + (1 - lam) * _onehot(y.flip(0), 5, smoothing)
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    if n % 2:  # odd batch: the middle element is mixed with itself
        torch.testing.assert_close(mixed[n // 2], x[n // 2])
        torch.testing.assert_close(targets[n // 2], _onehot(y, 5, smoothing)[n // 2])


@pytest.mark.parametrize("n", [6, 5])
def test_cutmix_box_area_matches_lam(n):
    mix = create_mixup(cutmix_alpha=1.0, num_classes=4)
    x, y = _batch(n, 4, seed=1)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = mix(x.clone(), y)
        lam = mix.last_lam
        box = (mixed[0] != x[0]).any(0)  # (H, W): pixels pasted from the flipped batch (one box per batch)
        assert float(box.float().mean()) == pytest.approx(1 - lam, abs=1e-6)
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a filled rectangle
        assert torch.equal(mixed[:, :, box], x.flip(0)[:, :, box]) and torch.equal(mixed[:, :, ~box], x[:, :, ~box])
        torch.testing.assert_close(targets, lam * _onehot(y, 4) + (1 - lam) * _onehot(y.flip(0), 4))
        if n % 2:
            assert torch.equal(mixed[n // 2], x[n // 2])


def test_mixup_reproducible_and_prob_zero_passes_through():
    mix = create_mixup(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=5)
    x, y = _batch(4)
    lams = []
    for _ in range(2):
        torch.manual_seed(7)
        np.random.seed(int(len(lams)))  # numpy's state must not matter
        out, t = mix(x.clone(), y)
        lams.append((mix.last_lam, out, t))
    assert lams[0][0] == lams[1][0] and torch.equal(lams[0][1], lams[1][1])
    off = create_mixup(mixup_alpha=1.0, prob=0.0, num_classes=5)
    out, t = off(x.clone(), y)
    assert off.last_lam == 1.0 and torch.equal(out, x) and torch.equal(t, _onehot(y, 5))


# ---------------------------------------------------------------- flip TTA


class _Linear(torch.nn.Module):
    def __init__(self, symmetric: bool):
        super().__init__()
        self.symmetric = symmetric
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        if self.symmetric:  # exactly flip-invariant: x + flip(x) is its own flip
            x = x + x.flip(-1)
        return self.fc(x.flatten(1))


def test_tta_flip_on_flip_invariant_model_is_plain_logits():
    torch.manual_seed(0)
    model, (x, _) = _Linear(symmetric=True), _batch(3)
    with torch.no_grad():
        assert torch.equal(tta_flip_logits(model, x), model(x))


def test_tta_flip_averages_image_and_mirror():
    torch.manual_seed(0)
    model, (x, _) = _Linear(symmetric=False), _batch(3)
    with torch.no_grad():
        got = tta_flip_logits(model, x)
        torch.testing.assert_close(got, (model(x) + model(x.flip(-1))) / 2)
        assert not torch.allclose(got, model(x))


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_train_transform_pickles_for_dataloader_workers(preset):
    import pickle

    tf = create_transform(CFG, is_training=True, aug=preset, rotation=10, gaussian_noise=0.02, gaussian_blur=0.5)
    img = _img("noise", size=(40, 30))
    assert torch.equal(_run(pickle.loads(pickle.dumps(tf)), img, 3), _run(tf, img, 3))
