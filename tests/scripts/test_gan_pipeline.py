"""train_gan -> generate -> train_classifier --synthetic.dir on the tiny toy set, end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_ARGS, last_error_line, run_script


def _gan_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.format", "cub", "--data.root", str(toy_root), "--data.num_workers", "0", "--gan.image_size", "16",
            "--gan.base_width", "8", "--gan.latent_dim", "8", "--train.batch_size", "8", "--train.progress", "false",
            "--train.grid_per_class", "2", "--train.output_dir", str(out), *extra]


def _train_gan(toy_root, out, *extra, env=None, check=True):
    proc = run_script("train_gan.py", _gan_args(toy_root, out, *extra), env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def gan_run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gan") / "cdcgan"
    _train_gan(toy_root, out, "--train.epochs", "2")
    return out


@pytest.fixture(scope="module")
def classifier_run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "clf"
    args = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--train.epochs", "1",
            "--train.output_dir", str(out)]
    proc = run_script("train_classifier.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _generate(*args: str, check: bool = True):
    proc = run_script("generate.py", list(args))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_losses_finite_and_the_export_redraws_the_last_grid(gan_run, tmp_path):
    from PIL import Image

    from fgclf.gan import generate_images, grid_labels, load_generator, sample_noise, save_grid

    history = [json.loads(line) for line in (gan_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h[k]) for h in history for k in ("d_loss", "g_loss", "d_real", "d_fake"))
    generator, meta = load_generator(gan_run)
    assert meta["ema"] and meta["epoch"] == 2 and meta["spec"]["num_classes"] == 4
    spec = meta["spec"]
    labels = grid_labels(4, 2, 12)
    save_grid(generate_images(generator, spec, sample_noise(spec, len(labels), seed=42), labels),
              tmp_path / "again.png", per_row=2)
    saved = np.asarray(Image.open(gan_run / "samples" / "epoch_002.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), saved)  # same noise + class -> same pixels
    assert saved.shape[0] > saved.shape[1]  # one row per class (4 rows of 2)
    cfg = yaml.safe_load((gan_run / "config.yaml").read_text())
    assert cfg["run"]["seed"] == 42 and cfg["run"]["spec"] == spec


@pytest.mark.slow
def test_kill_then_resume_equals_the_uninterrupted_run(gan_run, toy_root, tmp_path):
    from safetensors.torch import load_file

    cut = tmp_path / "cut"
    # 34 train images / batch 8 = 4 updates per epoch: update 6 is inside epoch 2
    killed = _train_gan(toy_root, cut, "--train.epochs", "2", env={"FGCLF_DEBUG_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode != 0 and json.loads((cut / "checkpoints/last/trainer_state.json").read_text())["epoch"] == 1
    resumed = _train_gan(toy_root, cut, "--train.epochs", "2", "--resume", "last")
    assert "resumed from" in resumed.stdout
    for name in ("generator.safetensors", "discriminator.safetensors"):
        a = load_file(str(gan_run / "checkpoints/generator" / name))
        b = load_file(str(cut / "checkpoints/generator" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")


@pytest.mark.parametrize("arch,extra", [("dcgan", ["--gan.loss", "lsgan"]),
                                        ("cdcgan", ["--gan.conditioning", "acgan", "--gan.loss", "bce"]),
                                        ("diffusion", ["--gan.diffusion_steps", "50", "--gan.sample_steps", "2"])])
def test_every_model_type_trains_a_few_steps(toy_root, tmp_path, arch, extra):
    from fgclf.gan import load_generator

    out = tmp_path / arch
    _train_gan(toy_root, out, "--gan.arch", arch, "--train.epochs", "1", *extra)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [v for k, v in record.items() if k.endswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    if "acgan" in extra:
        assert math.isfinite(record["d_aux"]) and math.isfinite(record["g_aux"])
    generator, meta = load_generator(out)
    assert meta["spec"]["arch"] == arch and (out / "samples" / "epoch_001.png").is_file()


def test_generate_labels_filter_and_manifest(gan_run, classifier_run, tmp_path):
    from fgclf.data import read_imagefolder

    everything = tmp_path / "all"
    _generate("--generator", str(gan_run), "--output_dir", str(everything), "--per_class", "5",
              "--classifier", str(classifier_run))
    rows = _manifest(everything)
    assert len(rows) == 20 and [r["label"] for r in rows] == sorted(r["label"] for r in rows)
    assert all(r["class_name"] in r["file"] and not r["pseudo_label"] and 0 <= r["score"] <= 1 for r in rows)
    rec = read_imagefolder(str(everything))
    by_file = {Path(p).relative_to(everything).as_posix(): rec.class_names[y] for p, y in zip(rec.items, rec.labels)}
    assert by_file == {r["file"]: r["class_name"] for r in rows}  # the folder loads with the manifest's labels
    threshold = float(np.median([r["score"] for r in rows]))
    kept_dir = tmp_path / "kept"
    _generate("--generator", str(gan_run), "--output_dir", str(kept_dir), "--per_class", "5",
              "--classifier", str(classifier_run), "--threshold", str(threshold))
    kept = _manifest(kept_dir)
    assert {r["noise_index"] for r in kept} == {r["noise_index"] for r in rows if r["score"] >= threshold}
    for a in kept:  # the same noise index gives the same image and score in both runs
        b = next(r for r in rows if r["noise_index"] == a["noise_index"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert (kept_dir / a["file"]).read_bytes() == (everything / b["file"]).read_bytes()
    summary = json.loads((kept_dir / "summary.json").read_text())
    assert summary["kept"] == len(kept) and sum(e["kept"] for e in summary["per_class"].values()) == len(kept)


def test_unconditional_images_get_pseudo_labels_from_the_classifier(toy_root, classifier_run, tmp_path):
    import torch

    from fgclf.data.transforms import create_transform
    from fgclf.models import create_model, read_checkpoint_config
    from PIL import Image

    gan = tmp_path / "dcgan"
    _train_gan(toy_root, gan, "--gan.arch", "dcgan", "--train.epochs", "1")
    refused = _generate("--generator", str(gan), "--output_dir", str(tmp_path / "x"), check=False)
    assert refused.returncode == 2 and "only from a classifier" in last_error_line(refused)
    out = tmp_path / "pseudo"
    _generate("--generator", str(gan), "--output_dir", str(out), "--per_class", "2", "--classifier",
              str(classifier_run))
    rows = _manifest(out)
    assert len(rows) == 8 and all(r["pseudo_label"] for r in rows)
    best = classifier_run / "checkpoints" / "best"
    meta = read_checkpoint_config(best)
    model = create_model(f"file:{best}", num_classes=meta["num_classes"]).eval()
    tf = create_transform(meta["data_config"], is_training=False)
    with torch.no_grad():
        logits = model(torch.stack([tf(Image.open(out / r["file"]).convert("RGB")) for r in rows]))
    assert [r["label"] for r in rows] == logits.argmax(1).tolist()


def test_synthetic_images_join_train_only(gan_run, toy_root, tmp_path):
    synth = tmp_path / "synth"
    _generate("--generator", str(gan_run), "--output_dir", str(synth), "--per_class", "4")
    base = ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS, "--train.epochs", "1"]
    real = tmp_path / "real"
    assert run_script("train_classifier.py", [*base, "--train.output_dir", str(real)]).returncode == 0
    mixed = tmp_path / "mixed"
    proc = run_script("train_classifier.py", [*base, "--train.output_dir", str(mixed), "--synthetic.dir", str(synth),
                                              "--synthetic.per_class", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "splits.json").read_text()) for d in (real, mixed))
    assert a["val"] == b["val"] and a["test"] == b["test"]  # validation and test stay the real images
    extra = [i for i in b["train"] if i not in a["train"]]
    assert len(extra) == 12 and all(i.startswith("synthetic/") for i in extra)
    assert not any(i.startswith("synthetic/") for i in b["val"] + b["test"])
    metrics = json.loads((mixed / "metrics.json").read_text())
    assert metrics["n_synthetic"] == 12 and metrics["num_samples"] == json.loads((real / "metrics.json").read_text())[
        "num_samples"]
    # a generator that saw one of this run's validation images is refused before training
    info = json.loads((synth / "generator.json").read_text())
    info["train_image_ids"].append(a["val"][0])
    (synth / "generator.json").write_text(json.dumps(info))
    refused = run_script("train_classifier.py", [*base, "--train.output_dir", str(tmp_path / "leak"),
                                                 "--synthetic.dir", str(synth)])
    assert refused.returncode == 2 and "not in this run's train split (val" in last_error_line(refused)
    assert not (tmp_path / "leak").exists()


@pytest.mark.slow
def test_two_processes_train_the_gan(toy_root, tmp_path):
    """DDP over 2 gloo processes: each draws its own slice of the global noise; the export loads."""
    from fgclf.gan import load_generator

    out = tmp_path / "ddp"
    proc = run_script("train_gan.py", _gan_args(toy_root, out, "--train.epochs", "1"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["d_loss"]) and math.isfinite(record["g_loss"])
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["num_processes"] == 2
    load_generator(out)


@pytest.mark.parametrize("extra,needle", [
    (["--gan.image_size", "24"], "power of two"),
    (["--gan.loss", "wgan"], "unknown GAN loss"),
    (["--gan.ema_decay", "1.5"], "ema_decay"),
    (["--train.batch_size", "500"], "fewer than train.batch_size"),
])
def test_train_gan_user_errors(toy_root, tmp_path, extra, needle):
    proc = run_script("train_gan.py", _gan_args(toy_root, tmp_path / "run", *extra))
    assert proc.returncode == 2 and needle in last_error_line(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()
