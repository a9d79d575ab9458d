"""DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes (gloo): the same numbers as one plain process,
resume included, and a consolidated export that loads without DeepSpeed."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from conftest import ACCELERATE, REPO, REPO_PYTHONPATH, TINY_ARGS, last_error_line, run_script

pytest.importorskip("deepspeed")


def _deepspeed(toy_root, out, *extra, env_extra=None, config="deepspeed_zero2.yaml", launch_args=()):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=REPO_PYTHONPATH, **(env_extra or {}))
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / config), *launch_args,
           str(REPO / "scripts" / "train_classifier.py"), "--data.format", "cub", "--data.root", str(toy_root),
           *TINY_ARGS, "--train.output_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ZeRO-3 (kill, resume, best epoch) stays in the default suite
def test_zero2_on_two_cpu_processes_matches_one_process(toy_root, tmp_path):
    common = ["--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01"]
    ds = _deepspeed(toy_root, tmp_path / "ds", *common)
    assert ds.returncode == 0, ds.stdout[-2000:] + ds.stderr[-4000:]
    one = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                              "--train.output_dir", str(tmp_path / "one"), *common])
    assert one.returncode == 0, one.stderr[-3000:]
    run = yaml.safe_load((tmp_path / "ds" / "config.yaml").read_text())["run"]
    assert run["distributed_type"] == "DEEPSPEED" and run["num_processes"] == 2
    shards = list((tmp_path / "ds" / "checkpoints/last/state").rglob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2  # ZeRO: the optimizer state is split over the 2 processes
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "ds"))
    for key in ("top1", "f1_macro", "auroc_macro", "loss"):
        assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    np.testing.assert_allclose(np.load(tmp_path / "one/predictions.npz")["logits"],
                               np.load(tmp_path / "ds/predictions.npz")["logits"], atol=1e-3)
    # the consolidated best export is an ordinary model file: it reloads without DeepSpeed
    from fgclf.models import create_model

    create_model(f"file:{tmp_path / 'ds/checkpoints/best'}", num_classes=4)


def _zero3_sharding_everything(tmp_path) -> str:
    """An accelerate config whose DeepSpeed JSON shards every tensor: with DeepSpeed's default
    ``stage3_param_persistence_threshold`` (1e5) every tensor of the tiny test model stays whole on
    each process, so nothing would be partitioned and a plain ``load_state_dict`` would pass."""
    ds_json = tmp_path / "zero3_shard_all.json"
    ds_json.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True}}))
    cfg = yaml.safe_load((REPO / "accelerate_configs" / "deepspeed_zero3_json.yaml").read_text())
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(ds_json)
    path = tmp_path / "zero3_shard_all.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_zero3_kill_and_resume_matches_one_process_and_tests_the_best_epoch(toy_root, tmp_path):
    """ZeRO-3 with every tensor partitioned: killed in epoch 2 and resumed, it ends where one process
    ends; the test metrics come from the best epoch's weights (epoch 2 of 3, loaded into the shards),
    and best/ holds the gathered model (its logits are the run's test logits)."""
    import torch
    from conftest import export_logits, train_toy

    config = _zero3_sharding_everything(tmp_path)
    common = ["--train.epochs", "3", "--data.aug.preset", "none", "--optim.lr", "0.01",
              "--train.early_stopping_metric", "loss"]
    train_toy(toy_root, tmp_path / "one", *common)
    # 32 train images / batch 8 = 4 updates per epoch: update 6 is inside epoch 2
    killed = _deepspeed(toy_root, tmp_path / "ds", *common, config=config,
                        env_extra={"FGCLF_DEBUG_KILL_AT_STEP": "6"})
    assert killed.returncode != 0
    assert json.loads((tmp_path / "ds/checkpoints/last/trainer_state.json").read_text())["epoch"] == 1
    resumed = _deepspeed(toy_root, tmp_path / "ds", *common, "--resume", "last", config=config)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    # really sharded: the module's own state in DeepSpeed's checkpoint holds only empty placeholders
    states = list((tmp_path / "ds/checkpoints/last/state").rglob("*mp_rank_00_model_states.pt"))
    assert states, "no DeepSpeed model states in last/"
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all(v.numel() == 0 for k, v in module.items() if "weight" in k or "bias" in k), \
        {k: tuple(v.shape) for k, v in list(module.items())[:5]}
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "ds"))
    assert a["best_epoch"] == b["best_epoch"] == 2 and b["epochs_run"] == 3  # the best is not the last epoch
    for key in ("top1", "f1_macro", "auroc_macro", "loss"):
        assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    ds_logits = np.load(tmp_path / "ds/predictions.npz")["logits"]
    np.testing.assert_allclose(np.load(tmp_path / "one/predictions.npz")["logits"], ds_logits, atol=1e-3)
    np.testing.assert_allclose(export_logits(tmp_path / "ds", toy_root), ds_logits, atol=1e-5)


def test_weight_penalty_under_zero3_is_refused(toy_root, tmp_path):
    """An explicit L1/Lp penalty sums the parameters, which ZeRO-3 leaves as empty placeholders on every
    process (the penalty would be 0): refused before the run directory appears."""
    proc = _deepspeed(toy_root, tmp_path / "x", "--train.epochs", "1", "--loss.regularizer", "l1",
                      config=_zero3_sharding_everything(tmp_path))
    assert proc.returncode != 0
    assert "loss.regularizer l1" in last_error_line(proc) and "ZeRO-3" in last_error_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a refusal under a real 2-process launch
def test_cpu_flag_that_would_silently_drop_deepspeed_is_refused(toy_root, tmp_path):
    proc = _deepspeed(toy_root, tmp_path / "x", "--train.epochs", "1", env_extra={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0 and "ACCELERATE_USE_CPU=1" in last_error_line(proc)


@pytest.mark.slow  # a refusal under a real 2-process launch
def test_fsdp_without_gpu_is_refused_instead_of_running_alone_twice(toy_root, tmp_path):
    """Without a GPU accelerate starts FSDP processes that each believe they are the only one (they
    trained and wrote the same run directory side by side): refused with a pointer to ZeRO-3."""
    proc = _deepspeed(toy_root, tmp_path / "x", "--train.epochs", "1", config="fsdp.yaml",
                      launch_args=("--num_processes", "2", "--mixed_precision", "no"))
    assert proc.returncode != 0 and "FSDP needs GPUs" in last_error_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_zero2_bf16_casts_inputs_and_exports_a_loadable_model(toy_root, tmp_path):
    """DeepSpeed bf16 casts the weights, not the inputs: the engine casts the batches too (and leaves
    them float32 for the weight EMA, which it keeps in float32)."""
    from conftest import assert_metrics_match_sklearn

    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=REPO_PYTHONPATH)
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml"),
           "--mixed_precision", "bf16", str(REPO / "scripts" / "train_classifier.py"), "--data.format", "cub",
           "--data.root", str(toy_root), *TINY_ARGS, "--train.epochs", "1", "--train.output_dir", str(tmp_path / "bf16"),
           "--train.ema_decay", "0.9"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(history[0]["val_ema/loss"])
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["run"]["mixed_precision"] == "bf16"
    assert_metrics_match_sklearn(tmp_path / "bf16", num_classes=4, num_samples=20)
    from fgclf.models import create_model

    create_model(f"file:{tmp_path / 'bf16/checkpoints/best'}", num_classes=4)


@pytest.mark.parametrize("extra,message", [
    (("--train.ema_decay", "0.9"), "train.ema_decay averages the whole weights"),
    pytest.param(("--train.sam_rho", "0.05"), "train.sam_rho perturbs the weights", marks=pytest.mark.slow),
    pytest.param(("--model.unfreeze", "0:head,1:all"), "model.unfreeze drops", marks=pytest.mark.slow)])
def test_tricks_that_need_whole_weights_or_gradients_are_refused_under_zero3(toy_root, tmp_path, extra, message):
    proc = _deepspeed(toy_root, tmp_path / "x", "--train.epochs", "1", *extra, config=_zero3_sharding_everything(tmp_path))
    assert proc.returncode != 0 and message in last_error_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ema_under_zero2_on_two_cpu_processes_matches_one_process(toy_root, tmp_path):
    """ZeRO-2 keeps whole weights on every process: the average (kept in float32) and the validation of
    both weights match one plain process."""
    common = ["--train.epochs", "2", "--data.aug.preset", "none", "--optim.lr", "0.01", "--train.ema_decay", "0.9"]
    ds = _deepspeed(toy_root, tmp_path / "ds", *common)
    assert ds.returncode == 0, ds.stdout[-2000:] + ds.stderr[-4000:]
    one = run_script("train_classifier.py", ["--data.format", "cub", "--data.root", str(toy_root), *TINY_ARGS,
                                              "--train.output_dir", str(tmp_path / "one"), *common])
    assert one.returncode == 0, one.stderr[-3000:]
    ha, hb = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "ds"))
    np.testing.assert_allclose([h["val_ema/loss"] for h in ha], [h["val_ema/loss"] for h in hb], atol=1e-4)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "ds"))
    assert a["best_weights"] == b["best_weights"] and abs(a["loss"] - b["loss"]) < 1e-4
