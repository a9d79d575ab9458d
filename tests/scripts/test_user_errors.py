"""Bad input: one ``error: ...`` line, exit status 2, before any training starts."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import TINY_ARGS, last_error_line, run_script


def _copy(toy_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(toy_root, dst)
    return dst


def _first_image(root: Path) -> Path:
    rel = (root / "images.txt").read_text().splitlines()[0].split(maxsplit=1)[1]
    return root / "images" / rel


def _run(root: Path | str, tmp_path: Path, *extra: str):
    proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(root), *TINY_ARGS,
                                              "--train.epochs", "1", "--train.output_dir", str(tmp_path / "run"),
                                              *extra])
    return proc, last_error_line(proc)


def _assert_refused(proc, line: str, *needles: str, run_dir: Path | None = None) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    if run_dir is not None:
        assert not run_dir.exists(), "a refused run must not leave a run directory behind"
    assert line.startswith("error: ") and "\n" not in line
    for needle in needles:
        assert needle in line, line
    assert "epoch 1" not in proc.stdout and "Traceback" not in proc.stderr


def test_missing_dataset_dir(tmp_path):
    proc, line = _run(tmp_path / "nope", tmp_path)
    _assert_refused(proc, line, "dataset folder does not exist", "nope", run_dir=tmp_path / "run")


def test_manifest_names_missing_file(toy_root, tmp_path):
    root = _copy(toy_root, tmp_path)
    img = _first_image(root)
    img.unlink()
    proc, line = _run(root, tmp_path)
    _assert_refused(proc, line, "names a missing file", img.name)


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_corrupt_image_is_named(toy_root, tmp_path, damage):
    root = _copy(toy_root, tmp_path)
    img = _first_image(root)
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    proc, line = _run(root, tmp_path)
    _assert_refused(proc, line, "unreadable image", img.name, run_dir=tmp_path / "run")


def test_skip_bad_images_lists_them_and_trains(toy_root, tmp_path):
    root = _copy(toy_root, tmp_path)
    img = _first_image(root)
    img.write_bytes(b"")
    proc, _ = _run(root, tmp_path, "--data.skip_bad_images", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert str(img.resolve()) in listed and len(listed.splitlines()) == 1


def test_unknown_model_suggests(toy_root, tmp_path):
    proc, line = _run(toy_root, tmp_path, "--model.name", "resnt18")
    _assert_refused(proc, line, "unknown model 'resnt18'", "resnet18", run_dir=tmp_path / "run")


def test_unknown_config_key(toy_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 1\n  epochz: 3\n")
    proc, line = _run(toy_root, tmp_path, "--config", str(cfg))
    _assert_refused(proc, line, "epochz")


def test_unknown_cli_flag(toy_root, tmp_path):
    proc, line = _run(toy_root, tmp_path, "--train.epochz", "3")
    _assert_refused(proc, line, "--train.epochz")


def test_yaml_syntax_error(toy_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: [epochs: 1\n")
    proc, line = _run(toy_root, tmp_path, "--config", str(cfg))
    _assert_refused(proc, line, "bad configuration")


@pytest.mark.parametrize("flags,needle", [
    (("--optim.lr", "-1"), "optim.lr must be > 0"),
    (("--train.batch_size", "0"), "train.batch_size must be >= 1"),
    (("--peft", "lora", "--model.strategy", "linear_probe"), "exclude each other"),
    (("--resume", "last", "--train.output_dir", ""), "needs --train.output_dir"),
    (("--optim.scheduler", "plateau", "--data.val_fraction", "0"), "plateau needs a validation split"),
    (("--optim.scheduler", "cosin"), "unknown lr schedule 'cosin'; did you mean: cosine"),
    (("--optim.name", "adamm"), "unknown optimizer 'adamm'; did you mean: adam"),
])
def test_impossible_values(toy_root, tmp_path, flags, needle):
    proc, line = _run(toy_root, tmp_path, *flags)
    _assert_refused(proc, line, needle)


def test_error_under_accelerate_launch(tmp_path):
    """The same one-line message reaches the user through ``accelerate launch``."""
    proc = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(tmp_path / "nope")],
                      launch=True)
    assert proc.returncode != 0
    assert "error: dataset folder does not exist" in proc.stderr
