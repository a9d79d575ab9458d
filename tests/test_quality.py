"""fgclf.quality (FID/KID) against numpy/scipy references and torchmetrics; scripts/image_quality.py end to end."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch import nn
from torchvision.transforms.functional import to_tensor

from fgclf.errors import UserError
from fgclf.quality import (FeatureExtractor, compute_fid_kid, compute_quality_per_class, create_feature_extractor,
                           extract_features, fid_kid_from_features, frechet_distance)

_spec = importlib.util.spec_from_file_location("image_quality_script", REPO / "scripts" / "image_quality.py")
image_quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = image_quality  # its dataclass resolves type hints through sys.modules
_spec.loader.exec_module(image_quality)

DIM = 16


def tiny_extractor() -> FeatureExtractor:
    """A fixed random conv + ReLU + global pooling (16-d) behind the same preprocessing as the real ones."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, DIM, 5, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(DIM, generator=g))
    body = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    return FeatureExtractor(body, name="tiny", num_features=DIM, input_size=(32, 32), mean=(0.5,) * 3,
                            std=(0.5,) * 3).eval()


def images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (upsampled noise), so that added noise changes their statistics."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def numpy_kid(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out by hand."""
    m, d = len(f_real), f_real.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f_real, f_real), k(f_fake, f_fake), k(f_real, f_fake)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.sum() / m ** 2)


# ----------------------------------------------------------------------------- FID
def test_fid_self_is_zero_and_grows_with_noise():
    ex, x = tiny_extractor(), images(48)
    self_fid = compute_fid_kid(x, x.clone(), extractor=ex, kid_subsets=5)
    fids = [compute_fid_kid(x, noisy(x, s), extractor=ex, kid_subsets=5)["fid"] for s in (0.05, 0.15, 0.4)]
    assert abs(self_fid["fid"]) < 1e-6 * fids[0] and abs(self_fid["fid"]) < 1e-3
    assert fids[0] > 1e-3 and fids[0] < fids[1] < fids[2], fids


def test_fid_equals_scipy_reference_and_torchmetrics_on_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ex, real, fake = tiny_extractor(), images(48, seed=0), noisy(images(40, seed=2), 0.1)
    got = compute_fid_kid(real, fake, extractor=ex, kid_subsets=5, batch_size=7)
    fr, ff = extract_features(real, extractor=ex).numpy(), extract_features(fake, extractor=ex).numpy()
    ref = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert got["fid"] == pytest.approx(ref, rel=1e-4) and ref > 1e-3
    assert (got["extractor"], got["feature_dim"], got["n_real"], got["n_fake"]) == ("tiny", DIM, 48, 40)
    # torchmetrics' own path, the extractor as its `feature` module on float [0, 1] images
    tm = FrechetInceptionDistance(feature=ex, normalize=True)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert got["fid"] == pytest.approx(float(tm.compute()), rel=1e-4)
    # batches from a DataLoader of (images, labels) give the same features
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real, torch.zeros(48)), batch_size=5)
    assert torch.equal(extract_features(loader, extractor=ex), torch.from_numpy(fr))


# ----------------------------------------------------------------------------- KID
def test_kid_one_full_subset_equals_numpy_mmd():
    ex, real, fake = tiny_extractor(), images(30, seed=3), noisy(images(30, seed=4), 0.2)
    got = compute_fid_kid(real, fake, extractor=ex, kid_subset_size=30, kid_subsets=1)
    fr, ff = extract_features(real, extractor=ex).numpy(), extract_features(fake, extractor=ex).numpy()
    assert got["kid_subset_size"] == 30 and got["kid_std"] == 0.0
    assert got["kid_mean"] == pytest.approx(numpy_kid(fr, ff), rel=1e-6)
    # subsets: the mean of per-subset MMDs, reproducible from the seed
    tr, tf = torch.from_numpy(fr), torch.from_numpy(ff)
    rng = torch.get_rng_state()
    sub = fid_kid_from_features(tr, tf, kid_subset_size=10, kid_subsets=20, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the subset draws leave the global RNG alone
    again = fid_kid_from_features(tr, tf, kid_subset_size=10, kid_subsets=20, seed=5)
    assert sub == again and sub["kid_std"] > 0


def test_kid_subset_size_adapts_and_too_few_images_refused():
    f = torch.randn(50, DIM, dtype=torch.float64)
    assert fid_kid_from_features(f[:12], f[12:], kid_subsets=2)["kid_subset_size"] == 12
    assert fid_kid_from_features(f[:12], f[12:], kid_subset_size=5, kid_subsets=2)["kid_subset_size"] == 5
    assert fid_kid_from_features(f[:20], f[20:], kid_subset_size=500, kid_subsets=2)["kid_subset_size"] == 20
    with pytest.raises(UserError, match="at least 2"):
        fid_kid_from_features(f[:1], f[1:], kid_subsets=2)
    with pytest.raises(UserError, match="at least 2"):
        compute_fid_kid(images(4), images(1), extractor=tiny_extractor(), kid_subsets=2)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        compute_fid_kid(images(4) * 2 - 1, images(4), extractor=tiny_extractor())
    with pytest.raises(UserError, match="uint8"):
        compute_fid_kid((images(4) * 255).byte(), images(4), extractor=tiny_extractor())


# ----------------------------------------------------------------------------- per class
def test_per_class_reuses_features_and_marks_tiny_classes():
    ex = tiny_extractor()
    real = {"a": images(12, seed=1), "b": images(10, seed=2), "c": images(6, seed=3)}
    fake = {"a": noisy(images(8, seed=4), 0.1), "b": images(9, seed=5), "c": images(1, seed=6)}
    got = compute_quality_per_class(real, fake, extractor=ex, kid_subsets=3)
    assert got["extractor"] == "tiny" and got["feature_dim"] == DIM and got["per_class"]["c"] is None
    for name in ("a", "b"):
        want = compute_fid_kid(real[name], fake[name], extractor=ex, kid_subsets=3)
        assert got["per_class"][name]["fid"] == pytest.approx(want["fid"], rel=1e-9)
        assert got["per_class"][name]["kid_mean"] == pytest.approx(want["kid_mean"], rel=1e-9)
    overall = compute_fid_kid(torch.cat(list(real.values())), torch.cat(list(fake.values())), extractor=ex,
                              kid_subsets=3)
    assert got["overall"]["fid"] == pytest.approx(overall["fid"], rel=1e-9) and got["overall"]["n_fake"] == 18
    with pytest.raises(UserError, match="not among the real classes"):
        compute_quality_per_class(real, {"zzz": images(3)}, extractor=ex)


# ----------------------------------------------------------------------------- extractors
def test_uint8_path_rounds_exactly():
    """The Inception input: images decoded from uint8 files come back as the same uint8 values."""
    class Echo(nn.Module):
        def forward(self, x):
            assert x.dtype == torch.uint8
            return x.flatten(1).float()

    ex = FeatureExtractor(Echo(), name="echo", num_features=12, to_uint8=True)
    values = torch.arange(256, dtype=torch.uint8)[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    x = values[:48].reshape(4, 3, 2, 2).float() / 255
    assert torch.equal(ex(x), values[:48].reshape(4, -1).float())


def test_effnet_lite0_features_and_auto_fallback(monkeypatch):
    import torchmetrics.utilities.imports as tm_imports

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ex = create_feature_extractor("effnet_lite0")
    assert (ex.name, ex.num_features, ex.input_size, ex.training) == ("effnet_lite0", 1280, (224, 224), False)
    f1, f2 = extract_features(x, extractor=ex), extract_features(x, extractor=ex, batch_size=1)
    assert f1.shape == (3, 1280) and f1.dtype == torch.float64
    assert torch.allclose(f1, f2, rtol=1e-5, atol=1e-6) and torch.equal(f1, extract_features(x, extractor=ex))
    assert f1.std(0).mean() > 0  # different images, different features
    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(UserError, match="effnet_lite0"):
        create_feature_extractor("inception")
    assert create_feature_extractor("auto").name == "effnet_lite0"
    with pytest.raises(UserError, match="unknown feature extractor"):
        create_feature_extractor("vgg")


# ----------------------------------------------------------------------------- script
def _fake_folder(toy_root: Path, tmp_path: Path, per_class: int = 4) -> tuple[Path, dict, dict]:
    """Train images of the toy dataset saved as PNG 'generated' images; returns (dir, fake, real test) tensors."""
    from fgclf.data import load_records

    rec = load_records(format="cub", root=str(toy_root))
    fake_dir, fake, real = tmp_path / "fake", {}, {}
    for path, label, split in zip(rec.items, rec.labels, rec.splits):
        name = rec.class_names[label]
        img = Image.open(path).convert("RGB")
        if split == "test":
            real.setdefault(name, []).append(to_tensor(img))
        elif split == "train" and len(fake.get(name, [])) < per_class:
            (fake_dir / name).mkdir(parents=True, exist_ok=True)
            img.save(fake_dir / name / f"{Path(path).stem}.png")
            fake.setdefault(name, []).append(to_tensor(img))
    return fake_dir, {c: torch.stack(v) for c, v in fake.items()}, {c: torch.stack(v) for c, v in real.items()}


def _run(monkeypatch, *argv) -> int:
    import fgclf.quality

    monkeypatch.setattr(fgclf.quality, "create_feature_extractor", lambda *a, **k: tiny_extractor())
    return image_quality.main([str(a) for a in argv])


def test_script_matches_library_per_class(toy_root, tmp_path, monkeypatch, capsys):
    fake_dir, fake, real = _fake_folder(toy_root, tmp_path)
    rc = _run(monkeypatch, "--fake", fake_dir, "--data.format", "cub", "--data.root", toy_root,
              "--data.num_workers", "0", "--per-class", "--kid-subsets", "4")
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((fake_dir / "quality.json").read_text())
    assert result["extractor"] == "tiny" and result["image_size"] == 32 and result["real"]["split"] == "test"
    assert "extractor: tiny (16-d)" in out and "different feature extractors are not comparable" in out
    want = compute_quality_per_class(real, fake, extractor=tiny_extractor(), kid_subsets=4)
    assert set(result["per_class"]) == set(real) and len(real) == 4
    for name, entry in result["per_class"].items():
        assert (entry["n_real"], entry["n_fake"]) == (5, 4)
        assert entry["fid"] == pytest.approx(want["per_class"][name]["fid"], rel=1e-6, abs=1e-9)
        assert entry["kid_mean"] == pytest.approx(want["per_class"][name]["kid_mean"], rel=1e-6, abs=1e-12)
        assert f"| {name} | 5 | 4 | {entry['fid']:.3f} |" in out
    assert result["overall"]["fid"] == pytest.approx(want["overall"]["fid"], rel=1e-6)
    assert (result["overall"]["n_real"], result["overall"]["n_fake"]) == (20, 16)


def test_script_reference_scores_real_train_images_like_generated_ones(toy_root, tmp_path, monkeypatch, capsys):
    from fgclf.data import load_records

    fake_dir, _, real = _fake_folder(toy_root, tmp_path)
    assert _run(monkeypatch, "--fake", fake_dir, "--data.format", "cub", "--data.root", toy_root,
                "--data.num_workers", "0", "--reference", "--kid-subsets", "4") == 0
    result = json.loads((fake_dir / "quality.json").read_text())
    rec = load_records(format="cub", root=str(toy_root))
    train = {}
    for path, label, split in zip(rec.items, rec.labels, rec.splits):
        if split == "train":
            train.setdefault(rec.class_names[label], []).append(to_tensor(Image.open(path).convert("RGB")))
    want = compute_fid_kid(torch.cat(list(real.values())), torch.cat([torch.stack(v) for v in train.values()]),
                           extractor=tiny_extractor(), kid_subsets=4)
    ref = result["reference"]
    assert ref["split"] == "train" and ref["n_fake"] == sum(len(v) for v in train.values())
    assert ref["fid"] == pytest.approx(want["fid"], rel=1e-6) and "reference: real train images" in capsys.readouterr().out


def test_script_manifest_and_user_errors(toy_root, tmp_path, monkeypatch, capsys):
    fake_dir, fake, real = _fake_folder(toy_root, tmp_path, per_class=3)
    names = sorted(real)
    base = ["--data.format", "cub", "--data.root", toy_root, "--data.num_workers", "0", "--kid-subsets", "2"]
    # the manifest decides which files count: two classes only; the real side follows
    lines = [{"file": str(p.relative_to(fake_dir)), "label": names.index(p.parent.name), "class_name": p.parent.name}
             for p in sorted(fake_dir.glob("*/*.png")) if p.parent.name in names[:2]]
    (fake_dir / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert _run(monkeypatch, "--fake", fake_dir, "--output", tmp_path / "q.json", *base) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert (result["overall"]["n_real"], result["overall"]["n_fake"]) == (10, 6) and "per_class" not in result
    want = compute_fid_kid(torch.cat([real[c] for c in names[:2]]), torch.cat([fake[c] for c in names[:2]]),
                           extractor=tiny_extractor(), kid_subsets=2)
    assert result["overall"]["fid"] == pytest.approx(want["fid"], rel=1e-6)
    assert result["missing_classes"] == names[2:]
    capsys.readouterr()

    def refused(*argv: str, needle: str) -> None:
        assert _run(monkeypatch, *argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err

    lines[0]["label"] = (lines[0]["label"] + 1) % len(names)
    (fake_dir / "manifest.jsonl").write_text(json.dumps(lines[0]) + "\n")
    refused("--fake", fake_dir, *base, needle="different class order")
    (fake_dir / "manifest.jsonl").unlink()
    (fake_dir / "Not_A_Bird").mkdir()
    shutil.copy(next(fake_dir.glob("*/*.png")), fake_dir / "Not_A_Bird" / "x.png")
    refused("--fake", fake_dir, *base, needle="Not_A_Bird")
    refused(*base, needle="--fake DIR is required")
    refused("--fake", tmp_path / "nope", *base, needle="does not exist")
    refused("--fake", fake_dir, "--bogus", "1", *base, needle="unknown option --bogus")
