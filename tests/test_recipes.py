"""Every shipped config for a real dataset, resolved against a tiny generated copy of its layout.

The per-dataset recipes (``configs/<dataset>_<backbone>_finetune.yaml``) each run one update of
their own model, optimiser and data section (only the weights, the image size and the batch
are made small); every other config of a real dataset (the CUB method recipes) resolves its
data section on the tiny copy.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import _run_in_process

from fgclf.config import TrainClassifierConfig, parse_config
from fgclf.data import load_records_from_config
from fgclf.data.layouts import LAYOUTS, write_layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if (yaml.safe_load(p.read_text()).get("data") or {}).get("format") in LAYOUTS)
RECIPES = [p for p in CONFIGS if p.name.endswith("_finetune.yaml")]
_copies: dict[str, Path] = {}


def tiny_copy(fmt: str, tmp_path_factory) -> Path:
    if fmt not in _copies:
        _copies[fmt] = write_layout(fmt, tmp_path_factory.mktemp(fmt), train_per_class=1, val_per_class=1,
                                    test_per_class=1, image_size=32)
    return _copies[fmt]


def test_every_dataset_has_both_recipes():
    have = {p.name for p in RECIPES}
    for fmt in LAYOUTS:
        assert f"{fmt}_resnet50_finetune.yaml" in have and f"{fmt}_vit_base_finetune.yaml" in have, fmt
    for p in RECIPES:  # the header says what the recipe aims at, and where the number comes from
        head = p.read_text().split("\ndata:")[0]
        assert "# Aims at: " in head and "REFERENCE_" not in head, p.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_data_section_resolves_on_a_tiny_copy(path, tmp_path_factory):
    cfg = parse_config(TrainClassifierConfig, ["--config", str(path)])
    cfg.data.root = str(tiny_copy(cfg.data.format, tmp_path_factory))
    records, bad = load_records_from_config(cfg.data)
    assert not bad and records.format == cfg.data.format
    n = json.loads((Path(cfg.data.root) / "fgclf_layout.json").read_text())["num_classes"]
    assert len(records.class_names) == n
    if cfg.data.merge_val:  # trained on train + the shipped val, as the recipe says
        assert "val" not in records.splits or cfg.data.val_fraction > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_one_update(path, tmp_path_factory, tmp_path):
    cfg = parse_config(TrainClassifierConfig, ["--config", str(path)])
    root = tiny_copy(cfg.data.format, tmp_path_factory)
    cfg.data.root = str(root)
    records = load_records_from_config(cfg.data)[0]
    n_train = records.splits.count("train")
    small = ["--data.root", str(root), "--model.pretrained", "false", "--data.image_size", "64",
             "--data.num_workers", "0", "--train.batch_size", str(n_train), "--train.epochs", "1",
             "--train.progress", "false", "--train.output_dir", str(tmp_path / "run")]
    if "vit_" in cfg.model.name:
        small += ["--model.kwargs", "{img_size: 64}"]
    proc = _run_in_process("train_classifier.py", ["--config", str(path), *small])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["global_step"] == 1
    saved, recipe = yaml.safe_load((run / "config.yaml").read_text()), yaml.safe_load(path.read_text())
    for section in ("model", "optim", "loss"):  # the recipe's own settings are what ran
        for key, value in (recipe.get(section) or {}).items():
            if (section, key) not in (("model", "pretrained"), ("model", "kwargs")):  # made small above
                assert saved[section][key] == value, (section, key)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_classes"] == len(records.class_names) and metrics["num_samples"] == records.splits.count("test")
