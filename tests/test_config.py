"""Config precedence, strictness, and every shipped config file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fgclf.config import TrainClassifierConfig, TrainGanConfig, load_config, parse_config, save_config
from fgclf.features import ProbeConfig
from fgclf.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 7\n  batch_size: 16\noptim:\n  lr: 0.5\n")
    cfg = parse_config(TrainClassifierConfig, ["--config", str(cfg_file), "--train.epochs", "3"])
    assert cfg.train.epochs == 3          # CLI beats YAML
    assert cfg.train.batch_size == 16     # YAML beats default
    assert cfg.optim.lr == 0.5
    assert cfg.train.seed == TrainClassifierConfig().train.seed  # default kept
    assert cfg.peft == "none" and cfg.model.name == "tf_efficientnet_lite0.pypi_in1k"


def test_peft_flag_as_in_the_design_card():
    assert parse_config(TrainClassifierConfig, ["--peft", "lora"]).peft == "lora"


@pytest.mark.parametrize("argv,needle", [
    (["--train.epochz", "1"], "epochz"),
    (["--train.epochs", "many"], "train.epochs"),
    (["--data.format", "zip"], "data.format"),
])
def test_bad_cli_is_a_one_line_user_error(argv, needle):
    with pytest.raises(UserError) as err:
        parse_config(TrainClassifierConfig, argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_save_and_load_round_trip(tmp_path):
    cfg = parse_config(TrainClassifierConfig, ["--train.epochs", "9", "--lora.target_modules", "[qkv, proj]"])
    save_config(cfg, tmp_path / "config.yaml", extra={"seed": 1})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"] == {"seed": 1}
    assert load_config(TrainClassifierConfig, tmp_path / "config.yaml") == cfg


EXPERIMENTS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep_"))
SWEEPS = sorted((REPO / "configs").glob("sweep_*.yaml"))
# the config class of each script a shipped config or sweep may run
SCRIPT_CONFIGS = {"scripts/train_classifier.py": TrainClassifierConfig, "scripts/train_gan.py": TrainGanConfig,
                  "scripts/train_probe.py": ProbeConfig}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_documents_its_command(path):
    text = path.read_text()
    assert "accelerate launch" in text.split("\n\n")[0] or text.startswith("#"), "header comment with the command"
    scripts = [script for script in SCRIPT_CONFIGS if script in text.split("\n\n")[0]]
    assert len(scripts) == 1, "the header names the script the config is for"
    cfg = parse_config(SCRIPT_CONFIGS[scripts[0]], ["--config", str(path)])
    if isinstance(cfg, TrainClassifierConfig):  # the method and its options exist
        from fgclf.methods import method_from_config

        method_from_config(cfg.method)
    raw = yaml.safe_load(text)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(cfg, section), key) == value, (section, key)
        else:
            assert getattr(cfg, section) == values


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_plan_expands_into_valid_runs(path, tmp_path):
    """Every run of a shipped sweep parses as a train_classifier command line."""
    from fgclf.sweep import expand, load_plan

    assert "python scripts/sweep.py" in path.read_text().split("\nname:")[0]
    plan = load_plan(path)
    runs = expand(plan, tmp_path)
    assert len(runs) == len({r.run_dir for r in runs}) >= 2
    for run in runs:
        script = run.settings.get("script", plan.get("script", "scripts/train_classifier.py"))
        base = run.settings.get("base", plan.get("base"))
        argv = (["--config", str(REPO / base)] if base else []) + run.flags()
        cfg = parse_config(SCRIPT_CONFIGS[script], argv)
        assert cfg.train.seed == run.seed
    for name, step in (plan.get("prepare") or {}).items():
        assert (REPO / step["script"]).is_file(), name


@pytest.mark.parametrize("script", ["train_classifier.py", "train_gan.py", "generate.py", "extract_features.py",
                                    "train_probe.py", "ensemble_eval.py", "predict.py", "export.py", "explain.py"])
def test_help_imports_no_torch(script):
    """``--help`` only parses: torch, timm and accelerate are imported after the config is read
    (bench/startup.py measures the time this saves)."""
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = [{s!r}, '--help']\ntry:\n    runpy.run_path({p!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('heavy:', sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code.format(s=script, p=str(REPO / "scripts" / script))],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and proc.stdout.strip().endswith("heavy: []"), proc.stdout[-500:]


@pytest.mark.parametrize("message, last, expected", [
    ("first\nsecond\n", False, "first"),
    ("\n  \nfirst\nlast\n\n", True, "last"),
    ("\x1b[1m\x1b[31mConversionError\x1b[0m: step failed\nmore", False, "ConversionError: step failed"),
    ("", False, "ValueError"),  # an empty message (the old splitlines()[0] raised IndexError here)
    ("  \n\t\n", True, "ValueError"),
    ("x" * 300, False, "x" * 200),
])
def test_message_line_of_an_error(message, last, expected):
    from fgclf.errors import message_line

    assert message_line(ValueError(message), last=last) == expected


def test_error_line_names_the_type_once():
    from fgclf.errors import error_line

    assert error_line(ValueError("bad\nmore")) == "ValueError: bad"
    assert error_line(ValueError("")) == "ValueError"  # not "ValueError: ValueError"
    assert error_line(KeyError("x" * 300), 10) == "KeyError: 'xxxxxxxxx"
