"""Bad input, in-process: scripts/check_data.py end to end, and the config, checkpoint and PEFT
refusals of train_classifier.py reached through its own functions (``validate``, ``build_model``)
without starting a training process. Each refusal is one ``UserError`` line (exit status 2).

Slower end-to-end refusals through a real ``train_classifier.py`` process are in test_user_errors.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgclf.config import TrainClassifierConfig, parse_config
from fgclf.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=None)
def _script(name: str):
    """``scripts/<name>.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _check(argv: list[str], capsys) -> tuple[int, str, str]:
    code = _script("check_data").main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- scripts/check_data.py
def test_check_data_on_a_good_dataset_exits_0_and_writes_only_the_report(toy_root, tmp_path, capsys):
    before = _snapshot(toy_root)
    code, out, err = _check(["--data.format", "cub", "--data.root", str(toy_root), "--workers", "2",
                             "--output", str(tmp_path / "report.json")], capsys)
    assert code == 0 and err == ""
    assert "images: 60 in 4 classes; train 32, val 8, test 20" in out and out.rstrip().endswith(
        "report written to " + str(tmp_path / "report.json"))
    assert "result: OK, the dataset is trainable" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["num_images"] == 60 and report["workers"] == 2
    assert _snapshot(toy_root) == before  # the dataset is only read


def test_check_data_names_each_unreadable_image_and_exits_2(toy_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    rel = dict(line.split(" ", 1) for line in (root / "images.txt").read_text().splitlines())
    trunc, empty, cmyk = (root / "images" / rel[i] for i in ("3", "33", "50"))
    trunc.write_bytes(trunc.read_bytes()[:300])
    empty.write_bytes(b"")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).convert("CMYK").save(cmyk, format="JPEG")
    before = _snapshot(root)
    code, out, err = _check(["--data.format", "cub", "--data.root", str(root)], capsys)
    assert code == 2
    lines = err.splitlines()  # one line per bad file, in image id order; CMYK is not an error
    assert len(lines) == 2, err
    assert lines[0].startswith(f"error: unreadable image {trunc.resolve()}: OSError: ")
    assert lines[1] == f"error: unreadable image {empty.resolve()}: zero-byte file"
    assert "modes: CMYK 1, RGB 57 (1 converted to RGB on load)" in out and "result: NOT trainable" in out
    # the same flag as training turns them into warnings
    code, out, err = _check(["--data.format", "cub", "--data.root", str(root), "--data.skip_bad_images", "true"], capsys)
    assert code == 0 and err == "" and "2 unreadable images will be skipped" in out
    assert _snapshot(root) == before


@pytest.mark.parametrize("argv,line", [
    (["--workers", "-1"], "error: --workers must be >= 0 (0: one per CPU core + 4)"),
    (["--data.formt", "cub"], "error: bad configuration:"),
    (["--data.format", "cub", "--data.root", "/nonexistent/cub"], "error: dataset folder does not exist: /nonexistent/cub"),
    (["--data.format", "cub"], "error: data.format=cub needs --data.root"),
])
def test_check_data_bad_arguments(argv, line, capsys):
    code, _, err = _check(argv, capsys)
    assert code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_train_classifier_check_data_runs_the_same_check_and_does_not_train(toy_root, tmp_path, capsys):
    from conftest import TINY_ARGS

    module = _script("train_classifier")
    if "--check-data" not in Path(module.__file__).read_text():
        pytest.skip("scripts/train_classifier.py has no --check-data yet")
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    argv = ["--check-data", "--data.format", "cub", "--data.root", str(root), *TINY_ARGS,
            "--train.output_dir", str(tmp_path / "run")]
    assert module.main(argv) == 0
    assert "result: OK, the dataset is trainable" in capsys.readouterr().out
    bad = root / "images" / (root / "images.txt").read_text().splitlines()[0].split(" ", 1)[1]
    bad.write_bytes(b"")
    assert module.main(argv) == 2
    assert capsys.readouterr().err == f"error: unreadable image {bad.resolve()}: zero-byte file\n"
    assert not (tmp_path / "run").exists()  # nothing trained, no run directory


# ----------------------------------------------------------------------------- config (train_classifier.py)
def _validate(*argv: str) -> None:
    _script("train_classifier").validate(parse_config(TrainClassifierConfig, list(argv)))


@pytest.mark.parametrize("flags,needle", [  # what test_user_errors.py::test_impossible_values does not cover
    (("--train.epochs", "0"), "train.epochs must be >= 1"),
    (("--train.eval_batch_size", "0"), "train.eval_batch_size must be >= 1"),
    (("--train.grad_accum_steps", "0"), "train.grad_accum_steps must be >= 1"),
    (("--optim.weight_decay", "-0.1"), "optim.weight_decay must be >= 0"),
    (("--data.val_fraction", "1"), "data.val_fraction must be in [0, 1)"),
    (("--data.test_fraction", "-0.2"), "data.test_fraction must be in [0, 1)"),
    (("--data.num_workers", "-1"), "data.num_workers must be >= 0"),
    (("--synthetic.ratio", "-1"), "synthetic.ratio and synthetic.per_class must be >= 0"),
    (("--synthetic.only", "true"), "synthetic.only needs --synthetic.dir"),
    (("--synthetic.dir", "/nonexistent/synth"), "--synthetic.dir: no such folder: /nonexistent/synth"),
    (("--resume", "/nonexistent/run"), "--resume: no such checkpoint or run directory: /nonexistent/run"),
    (("--parallel", "pipeline", "--train.batch_size", "8", "--pp.microbatches", "3"),
     "train.batch_size 8 must be a multiple of pp.microbatches 3"),
    (("--parallel", "pipeline", "--peft", "lora"), "--parallel pipeline trains the whole model"),
    (("--parallel", "pipeline", "--train.drop_last", "false"), "--parallel pipeline always drops the last"),
    (("--train.early_stopping_metric", "top7"), "unknown early_stopping_metric 'top7'"),
    (("--loss.name", "focall"), "unknown loss 'focall'; did you mean: focal"),
    (("--optim.name", "lamb", "--optim.fused", "true"), "optim.fused: lamb has no fused implementation"),
])
def test_out_of_range_and_contradictory_values(flags, needle):
    with pytest.raises(UserError) as err:
        _validate(*flags)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("yaml_text,needle", [
    ("train:\n  epochs: many\n", 'Parser key "train.epochs": Expected a <class \'int\'>'),
    ("optim:\n  lr: fast\n", 'Parser key "optim.lr"'),
    ("data:\n  val_fraction: [0.1]\n", 'Parser key "data.val_fraction"'),
    ("lora:\n  target_modules: qkv\n", 'Parser key "lora.target_modules"'),
    ("- a list\n- not settings\n", "bad configuration"),
])
def test_wrong_types_in_a_yaml_config(tmp_path, yaml_text, needle):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(UserError) as err:
        parse_config(TrainClassifierConfig, ["--config", str(tmp_path / "c.yaml")])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_scalar_given_for_a_config_section_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: 0.1\n")
    with pytest.raises(UserError, match="optim"):
        _validate("--config", str(tmp_path / "c.yaml"))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("theirs,needle", [
    ({"model_name": "resnet18"}, "model_name is 'resnet18' there but 'test_efficientnet_gn' in this run"),
    ({"peft": {"method": "lora", "r": 8}}, "peft is {'method': 'lora', 'r': 8} there but None in this run"),
])
def test_checkpoint_of_another_model_is_refused(tmp_path, theirs, needle):
    """The class-count case runs end to end in test_train_classifier.py::test_resume_refuses_other_class_count_..."""
    from fgclf.checkpoint import Checkpointer

    meta = {"model_name": "test_efficientnet_gn", "num_classes": 4, "peft": None}
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({**meta, **theirs}))
    with pytest.raises(UserError) as err:
        Checkpointer(None, tmp_path / "new", meta=meta).check_compatible(ckpt)
    assert f"cannot resume from {ckpt}: {needle}" == str(err.value)
    (ckpt / "config.json").unlink()
    with pytest.raises(UserError, match="not an fgclf checkpoint \\(no config.json\\)"):
        Checkpointer(None, tmp_path / "new", meta=meta).check_compatible(ckpt)


# ----------------------------------------------------------------------------- PEFT
def test_peft_target_that_matches_nothing_is_refused_before_training():
    cfg = parse_config(TrainClassifierConfig, ["--model.name", "test_efficientnet_gn", "--model.pretrained", "false",
                                               "--peft", "lora", "--lora.target_modules", "[no_such_layer]"])
    _script("train_classifier").validate(cfg)
    with pytest.raises(UserError) as err:
        script = _script("train_classifier")
        script.build_model(cfg, 4, script.run_method(cfg))
    assert "PEFT target modules ['no_such_layer'] match no Linear/Conv layer of EfficientNet" in str(err.value)
    assert "\n" not in str(err.value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ----------------------------------------------------------------------------- launcher environments
@pytest.mark.parametrize("env,needle", [  # the same refusals under a real launch: test_deepspeed.py (slow)
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP needs GPUs"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "1"}, "ACCELERATE_USE_CPU=1 silently turns"),
])
def test_launcher_environments_that_cannot_work_are_refused(monkeypatch, env, needle):
    import torch

    from fgclf.runtime import create_accelerator

    if torch.cuda.is_available() and "ACCELERATE_USE_FSDP" in env:
        pytest.skip("FSDP runs where there is a GPU")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as err:
        create_accelerator()
    assert needle in str(err.value) and "\n" not in str(err.value)
