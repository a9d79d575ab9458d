"""scripts/extract_features.py and scripts/train_probe.py on tiny data.

Each test compares numbers against a reference computed here: the live backbone's pre-logits
output, a single-process extraction, sklearn's LogisticRegression and metrics recomputed from
predictions.npz.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, assert_metrics_match_sklearn, last_error_line, run_script

# a tiny GroupNorm model at 32 px; batch 8 leaves a short last batch in every split
EXTRACT_ARGS = ["--data.format", "cub", "--model.name", "test_efficientnet_gn", "--model.pretrained", "false",
                "--data.image_size", "32",
                "--data.num_workers", "0", "--progress", "false", "--batch_size", "8"]
PROBE_ARGS = ["--train.epochs", "60", "--train.log_every", "20"]


def _extract(root: Path, out: Path, *extra: str, nproc: int = 1, check: bool = True):
    proc = run_script("extract_features.py", [*EXTRACT_ARGS, "--data.root", str(root), "--output_dir", str(out),
                                              *extra], nproc=nproc)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _probe(features: Path, out: Path, *extra: str, check: bool = True):
    proc = run_script("train_probe.py", ["--features", str(features), "--train.output_dir", str(out), *PROBE_ARGS,
                                         *extra])
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _load_split(directory: Path, split: str):
    from fgclf.features import features_path, load_features

    return load_features(features_path(directory, split))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Seeded random weights of the tiny model, so the test can rebuild the same backbone."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("test_efficientnet_gn", num_classes=4)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def features_dir(toy_root, weights_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "tiny"
    _extract(toy_root, out, "--model.weights", str(weights_file))
    return out


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    """3 classes x (9 train + 5 test): odd split sizes, so 2 processes see a padded last batch."""
    from fgclf.data import generate_toy_cub

    return generate_toy_cub(tmp_path_factory.mktemp("odd") / "toy_odd", num_classes=3, train_per_class=9,
                            test_per_class=5, image_size=32, seed=1)


def _cub_tables(root: Path) -> tuple[dict, dict, dict]:
    read = lambda name: dict(line.split(maxsplit=1) for line in (root / name).read_text().splitlines())  # noqa: E731
    return read("images.txt"), read("image_class_labels.txt"), read("train_test_split.txt")


def test_cached_features_equal_live_backbone(features_dir, weights_file, toy_root):
    """Rows are the pre-logits output of the same backbone, computed here from the image files."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    meta = json.loads((features_dir / "meta.json").read_text())
    assert meta["feature_dim"] == 256 and meta["splits"] == {"train": 32, "val": 8, "test": 20}
    assert meta["num_processes"] == 1 and "extract_features.py" in meta["command"]
    model = timm.create_model("test_efficientnet_gn", num_classes=4)
    model.load_state_dict(load_file(str(weights_file)))
    model.eval()
    data_cfg = {**resolve_data_config(model=model), "input_size": (3, 32, 32)}
    transform = create_transform(**data_cfg, is_training=False)
    paths, labels, is_train = _cub_tables(toy_root)
    seen = []
    for split in ("train", "val", "test"):
        fs = _load_split(features_dir, split)
        assert fs.features.dtype == np.float32 and fs.features.shape == (meta["splits"][split], 256)
        assert fs.meta["class_names"] == meta["class_names"] and len(meta["class_names"]) == 4
        assert [int(labels[i]) - 1 for i in fs.image_ids] == fs.labels.tolist()
        assert all((is_train[i] == "0") == (split == "test") for i in fs.image_ids)
        x = torch.stack([transform(Image.open(toy_root / "images" / paths[i]).convert("RGB")) for i in fs.image_ids])
        with torch.no_grad():
            live = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
            logits = model(x).numpy()
        np.testing.assert_allclose(fs.features, live, atol=1e-5, rtol=0)
        assert not np.allclose(fs.features[:, :4], logits, atol=1e-3)  # pre-logits, not the classifier output
        seen += fs.image_ids
    assert sorted(seen, key=int) == sorted(paths, key=int)  # every image once


def test_extract_features_unwraps_peft_and_keeps_adapters_active():
    """A LoRA model's features are its merged model's pre-logits; the caller's train mode survives."""
    pytest.importorskip("peft")
    import timm
    import torch

    from fgclf.features import extract_features
    from fgclf.models import apply_peft
    from fgclf.runtime import create_accelerator

    torch.manual_seed(0)
    peft_model = apply_peft(timm.create_model("test_efficientnet_gn", num_classes=3), r=4)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    x, y = torch.randn(10, 3, 32, 32), torch.arange(10) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    peft_model.train()
    feats, labels = extract_features(create_accelerator(log_with=None), peft_model, loader)
    assert peft_model.training, "the caller's mode is restored"
    base = peft_model.get_base_model()
    with torch.no_grad(), peft_model.disable_adapter():
        without_adapters = base.eval().forward_head(base.forward_features(x), pre_logits=True).numpy()
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        expected = merged.forward_head(merged.forward_features(x), pre_logits=True).numpy()
    assert feats.shape == (10, merged.num_features) and labels.tolist() == y.tolist()
    np.testing.assert_allclose(feats, expected, atol=1e-5, rtol=0)
    assert np.abs(feats - without_adapters).max() > 1e-2, "the adapters must change the features"


def test_two_processes_write_the_same_features_in_the_same_order(odd_root, tmp_path):
    """2 gloo processes shard every split (last batches padded) and gather each image once, in order."""
    one, two = tmp_path / "one", tmp_path / "two"
    _extract(odd_root, one, "--batch_size", "4")
    _extract(odd_root, two, "--batch_size", "4", nproc=2)
    meta1, meta2 = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert meta2["num_processes"] == 2 and meta1["num_processes"] == 1
    assert meta1["splits"] == meta2["splits"] == {"train": 24, "val": 3, "test": 15}
    for split in ("train", "val", "test"):
        a, b = _load_split(one, split), _load_split(two, split)
        assert b.image_ids == a.image_ids and len(set(b.image_ids)) == len(b.image_ids)
        np.testing.assert_array_equal(b.labels, a.labels)
        np.testing.assert_allclose(b.features, a.features, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def probe_runs(features_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probes")
    runs = {head: root / head for head in ("linear", "sklearn")}
    for head, out in runs.items():
        _probe(features_dir, out, "--head", head)
    return runs


def test_probe_run_directory(probe_runs, features_dir):
    run = probe_runs["linear"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "predictions.npz", "confusion_matrix.csv",
                 "confusion_matrix.png", "per_class.csv", "curves.png", "report.md",
                 "checkpoints/best/head.safetensors", "checkpoints/best/config.json"):
        assert (run / name).exists(), name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["head"] == "linear" and cfg["run"]["seed"] == 42 and "torch" in cfg["run"]["versions"]
    assert "train_probe.py" in cfg["run"]["command"] and cfg["run"]["features"]["feature_dim"] == 256
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    m = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, m["epochs_run"] + 1))
    assert all(h["val/num_samples"] == 8 for h in history)
    best = min(history, key=lambda h: h["val/loss"])  # early stopping watches val loss
    assert m["best_epoch"] == best["epoch"]
    assert m["stopped_early"] == (m["epochs_run"] < 60)


def test_probe_metrics_json_equals_sklearn_from_predictions(probe_runs, features_dir):
    for run in probe_runs.values():
        npz = assert_metrics_match_sklearn(run, num_classes=4, num_samples=20)
        test = _load_split(features_dir, "test")
        assert list(npz["image_ids"]) == test.image_ids
        np.testing.assert_array_equal(npz["labels"], test.labels)


def test_saved_head_reproduces_the_test_predictions(probe_runs, features_dir):
    from fgclf.features import load_probe_head, predict_logits

    for run in probe_runs.values():
        head, config = load_probe_head(run / "checkpoints" / "best")
        assert config["model_name"] == "test_efficientnet_gn" and config["feature_dim"] == 256
        logits = predict_logits(head, _load_split(features_dir, "test").features)
        np.testing.assert_allclose(logits, np.load(run / "predictions.npz")["logits"], atol=1e-5)


def _sklearn_reference(features: Path, c: float = 1.0):
    """LogisticRegression fitted here on train features standardised with train statistics."""
    from sklearn.linear_model import LogisticRegression

    train, test = _load_split(features, "train"), _load_split(features, "test")
    mean, std = train.features.mean(0), train.features.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    model = LogisticRegression(C=c, max_iter=2000).fit((train.features - mean) / std, train.labels)
    return model.predict_proba((test.features - mean) / std), test.labels


def test_sklearn_head_matches_logistic_regression(probe_runs, features_dir):
    probs, _ = _sklearn_reference(features_dir)
    npz = np.load(probe_runs["sklearn"] / "predictions.npz")
    np.testing.assert_allclose(npz["probs"], probs, atol=1e-4)


def _write_feature_dir(out: Path, *, seed: int = 0, dim: int = 32, classes: int = 4, n: tuple = (240, 80, 400),
                       noise: float = 3.5) -> Path:
    """Overlapping Gaussian class clusters in the cache format (linearly separable up to noise)."""
    from fgclf.features import features_path, save_features

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 1.5 + 3.0  # not centred, with unequal scales per dim
    scales = rng.uniform(0.5, 4.0, size=dim)
    names = [f"class_{i}" for i in range(classes)]
    for split, count in zip(("train", "val", "test"), n):
        y = np.arange(count) % classes
        x = (centres[y] + noise * rng.normal(size=(count, dim))) * scales
        save_features(features_path(out, split), x, y, [f"{split}{i}" for i in range(count)],
                      {"split": split, "class_names": names})
    meta = {"model_name": "synthetic", "feature_dim": dim, "class_names": names, "num_classes": classes,
            "splits": dict(zip(("train", "val", "test"), n))}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_torch_linear_probe_matches_sklearn_accuracy(tmp_path):
    """On features a linear model can separate up to noise, both probes reach the same accuracy."""
    features = _write_feature_dir(tmp_path / "feats")
    _probe(features, tmp_path / "linear", "--head", "linear", "--train.epochs", "300", "--optim.lr", "0.01")
    _probe(features, tmp_path / "sklearn", "--head", "sklearn")
    torch_top1, sk_top1 = (json.loads((tmp_path / h / "metrics.json").read_text())["top1"]
                           for h in ("linear", "sklearn"))
    probs, y = _sklearn_reference(features)
    reference = float((probs.argmax(1) == y).mean())
    assert sk_top1 == pytest.approx(reference, abs=1e-9)
    assert 0.7 < reference < 0.95, reference  # neither chance nor trivial: differences would show
    assert abs(torch_top1 - reference) <= 0.02, (torch_top1, reference)  # 8 of 400 test samples


# ----------------------------------------------------------------------------- bad input
def _in_process(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's ``main(argv)`` in this process (fast); returns (exit status, last error line)."""
    spec = importlib.util.spec_from_file_location(f"_script_{Path(script).stem}", REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    return code, err[-1] if err else ""


def test_feature_dim_mismatch_is_refused(features_dir, tmp_path):
    from fgclf.features import features_path, save_features

    bad = tmp_path / "bad"
    shutil.copytree(features_dir, bad)
    val = _load_split(bad, "val")
    save_features(features_path(bad, "val"), val.features[:, :255], val.labels, val.image_ids, val.meta)
    proc = _probe(bad, tmp_path / "run", check=False)
    line = last_error_line(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line == "error: feature dim mismatch: features_val.safetensors has 255 columns but meta.json says 256"
    assert not (tmp_path / "run").exists(), "a refused run must not leave a run directory behind"


@pytest.mark.parametrize("case", ["missing_file", "missing_dir", "no_flag", "not_features"])
def test_bad_feature_input_is_one_line_exit_2(case, features_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    if case != "missing_dir":
        shutil.copytree(features_dir, bad)
    if case == "missing_file":
        (bad / "features_test.safetensors").unlink()
    if case == "not_features":  # a valid safetensors file, but not one of ours
        import torch
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2, 2)}, str(bad / "features_train.safetensors"))
    argv = ([] if case == "no_flag" else ["--features", str(bad)]) + ["--train.output_dir", str(tmp_path / "run")]
    code, line = _in_process("train_probe.py", argv, capsys)
    expected = {"missing_file": f"features file not found: {bad / 'features_test.safetensors'}",
                "missing_dir": f"feature directory not found: {bad}",
                "no_flag": "--features DIR is required",
                "not_features": "is not an fgclf features file"}[case]
    assert code == 2 and expected in line, line
    assert not (tmp_path / "run").exists()


def test_extract_refuses_to_overwrite_features(features_dir, toy_root, capsys):
    before = (features_dir / "meta.json").read_bytes()
    code, line = _in_process("extract_features.py", [*EXTRACT_ARGS, "--data.root", str(toy_root),
                                                     "--output_dir", str(features_dir)], capsys)
    assert code == 2 and "already holds features" in line, line
    assert (features_dir / "meta.json").read_bytes() == before


@pytest.mark.parametrize("flags, expected", [
    (["--optim.name", "lamb", "--optim.fused", "true"], "optim.fused: lamb has no fused implementation"),
    (["--head", "sklearn", "--optim.fused", "true"], "optim.fused is for the torch heads"),
])
def test_probe_refuses_a_fused_optimizer_it_cannot_use(flags, expected, features_dir, tmp_path, capsys):
    code, line = _in_process("train_probe.py", ["--features", str(features_dir), "--train.output_dir",
                                                str(tmp_path / "run"), *flags], capsys)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "run").exists()
