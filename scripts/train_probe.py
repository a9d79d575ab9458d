#!/usr/bin/env python
"""Train a classifier head on cached backbone features (from scripts/extract_features.py).

    accelerate launch scripts/extract_features.py --output_dir runs/features/toy_lite0
    # linear probe, full-batch AdamW with cosine lr, early stopping on val loss
    python scripts/train_probe.py --features runs/features/toy_lite0 --head linear
    # a 2-layer MLP head with minibatches, or scikit-learn's LogisticRegression as a reference
    python scripts/train_probe.py --features runs/features/toy_lite0 --head mlp --train.batch_size 256
    python scripts/train_probe.py --features runs/features/toy_lite0 --head sklearn --sklearn_c 0.5

Features are small (N x D floats: 6k CUB train images x 1280 = 30 MB), so the head trains in
one process, on the GPU when there is one. Under ``accelerate launch`` with several processes
only rank 0 trains; the others exit at once.

Writes a run directory like train_classifier.py: config.yaml (resolved config, seed, versions,
command, feature meta), metrics.jsonl (one line per epoch), metrics.json, predictions.npz,
confusion_matrix.csv/.png, per_class.csv, curves.png, report.md and checkpoints/best/
(head.safetensors + config.json: the head takes raw pre-logits features of the backbone named
there; ``fgclf.features.load_probe_head`` rebuilds it).
Flags: ``--help`` lists all; precedence is defaults < ``--config`` YAML < CLI flags.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import ProbeConfig, parse_config, save_config  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import command_line, default_run_name, prepare_run_dir, script_main  # noqa: E402


def validate(cfg: ProbeConfig) -> None:
    """Reject impossible values and unknown names before anything is read."""
    t, o = cfg.train, cfg.optim
    checks = [(cfg.features is not None, "--features DIR is required (a directory from scripts/extract_features.py)"),
              (t.epochs >= 1, "train.epochs must be >= 1"),
              (t.batch_size >= 0, "train.batch_size must be >= 0 (0: full batch)"),
              (t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0"),
              (o.lr > 0, "optim.lr must be > 0"),
              (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
              (0 <= cfg.dropout < 1, "dropout must be in [0, 1)"),
              (cfg.hidden_dim >= 1, "hidden_dim must be >= 1"),
              (cfg.sklearn_c > 0, "sklearn_c must be > 0"),
              (not (o.fused and cfg.head == "sklearn"), "optim.fused is for the torch heads; --head sklearn is fitted "
                                                          "by scikit-learn's solver")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    from fgclf.optim import check_fused, list_optimizers, list_schedulers
    from fgclf.registry import unknown_name_message

    for kind, name, known in (("optimizer", o.name.lower(), list_optimizers()),
                              ("lr schedule", o.scheduler, list_schedulers())):
        if name not in known:
            raise UserError(unknown_name_message(kind, name, known))
    check_fused(o.name, o.fused)


def train_torch_head(cfg: ProbeConfig, sets: dict, num_classes: int, device, run_dir: Path):
    """The linear/MLP head trained with ``cfg.optim``; metrics.jsonl gets one line per epoch."""
    import torch

    from fgclf.features import ProbeHead, fit_head
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.report import append_jsonl
    from fgclf.utils import peak_memory_mb

    t, o = cfg.train, cfg.optim
    train, val = sets["train"], sets.get("val")
    torch.manual_seed(t.seed)
    head = ProbeHead(train.dim, num_classes, kind=cfg.head, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout)
    if cfg.standardize:
        head.set_standardization(torch.from_numpy(train.features))
    head.to(device)
    optimizer = create_optimizer(head, name=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                 layer_decay=o.layer_decay, fused=o.fused)
    bs = t.batch_size if 0 < t.batch_size < len(train) else len(train)
    scheduler = create_scheduler(optimizer, name=o.scheduler, epochs=t.epochs, step_on=o.step_on,
                                 updates_per_epoch=-(-len(train) // bs), warmup_epochs=o.warmup_epochs,
                                 min_lr_ratio=o.min_lr_ratio, milestones=o.milestones, gamma=o.gamma,
                                 restart_epochs=o.restart_epochs, restart_mult=o.restart_mult,
                                 plateau_patience=o.plateau_patience,
                                 plateau_mode="min" if t.early_stopping_metric == "loss" else "max")

    def on_epoch(record: dict) -> None:
        record["memory_mb"] = peak_memory_mb(device)
        append_jsonl(run_dir / "metrics.jsonl", record)
        if t.progress and (record["epoch"] % max(t.log_every, 1) == 0 or record["epoch"] == t.epochs):
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                           if k in ("epoch", "train_loss", "val/loss", "val/top1", "lr")), flush=True)

    result = fit_head(head, train, val, optimizer=optimizer, scheduler=scheduler, epochs=t.epochs,
                      batch_size=t.batch_size, metric=t.early_stopping_metric, patience=t.early_stopping_patience,
                      min_delta=t.early_stopping_min_delta, seed=t.seed, on_epoch=on_epoch)
    return head, {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                  "stopped_early": result.stopped_early}


def train_sklearn_head(cfg: ProbeConfig, sets: dict, num_classes: int, run_dir: Path):
    """LogisticRegression as a linear head; metrics.jsonl gets its one (final) line."""
    import torch
    from torch.nn import functional as F

    from fgclf.features import fit_sklearn_head, predict_logits
    from fgclf.metrics import compute_metrics
    from fgclf.report import append_jsonl
    from fgclf.utils import peak_memory_mb

    start = time.perf_counter()
    train, val = sets["train"], sets.get("val")
    head = fit_sklearn_head(train, num_classes, c=cfg.sklearn_c, max_iter=cfg.sklearn_max_iter,
                            standardize=cfg.standardize)
    logits = torch.from_numpy(predict_logits(head, train.features))
    record = {"epoch": 1, "step": head.sklearn_iterations,
              "train_loss": float(F.cross_entropy(logits, torch.from_numpy(train.labels)))}
    if val is not None and len(val):
        val_logits = predict_logits(head, val.features)
        record["val/loss"] = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val.labels)))
        record["val/num_samples"] = len(val)
        record.update({f"val/{k}": v for k, v in compute_metrics(val_logits, val.labels,
                                                                 num_classes=num_classes).items()})
    record["epoch_time"] = time.perf_counter() - start
    record["memory_mb"] = peak_memory_mb("cpu")  # scikit-learn runs on the CPU
    append_jsonl(run_dir / "metrics.jsonl", record)
    if head.sklearn_iterations >= cfg.sklearn_max_iter:
        print(f"warning: LogisticRegression stopped at sklearn_max_iter={cfg.sklearn_max_iter} without converging")
    return head, {"best_epoch": 1, "epochs_run": 1, "stopped_early": False,
                  "sklearn_iterations": head.sklearn_iterations}


@script_main
def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- config
    cfg = parse_config(ProbeConfig, argv, prog="train_probe.py", description=__doc__)
    validate(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # features are small: one process trains
        return 0
    import numpy as np
    import torch
    from torch.nn import functional as F

    from fgclf.features import features_path, load_feature_dir, predict_logits, save_probe_head
    from fgclf.metrics import format_metrics_table
    from fgclf.report import read_jsonl, write_evaluation
    from fgclf.utils import package_versions

    # ---------------------------------------------------------------- data (cached features)
    sets, meta = load_feature_dir(cfg.features)
    class_names = list(meta["class_names"])
    t = cfg.train
    if "val" not in sets and (t.early_stopping_patience > 0 or cfg.optim.scheduler == "plateau"):
        raise UserError(f"{cfg.features} has no val features; early stopping and the plateau schedule need them "
                        "(set --train.early_stopping_patience 0, or extract with data.val_fraction > 0)")
    backbone = meta.get("model_name", "backbone")
    name = default_run_name("probe", str(backbone).split("/")[-1].replace("file:", ""), cfg.head)
    run_dir = prepare_run_dir(t.output_dir, t.name, default_name=name, resuming=False, create=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    save_config(cfg, run_dir / "config.yaml", extra={
        "seed": t.seed, "command": command_line(), "device": str(device), "versions": package_versions(),
        "features": {"dir": str(Path(cfg.features).resolve()), "model_name": backbone,
                     "feature_dim": meta["feature_dim"], "data_config": meta.get("data_config"),
                     "extract_command": meta.get("command")},
        "split_sizes": {s: len(fs) for s, fs in sets.items()}})
    print(f"run directory: {run_dir}\n{cfg.head} head on {meta['feature_dim']}-d features of {backbone}; "
          f"train/val/test = {len(sets['train'])}/{len(sets.get('val', ()))}/{len(sets['test'])}", flush=True)
    # ---------------------------------------------------------------- train
    start = time.perf_counter()
    if cfg.head == "sklearn":
        head, info = train_sklearn_head(cfg, sets, len(class_names), run_dir)
    else:
        head, info = train_torch_head(cfg, sets, len(class_names), device, run_dir)
    train_seconds = time.perf_counter() - start
    # ---------------------------------------------------------------- test + save
    head = head.cpu()
    save_probe_head(run_dir / "checkpoints" / "best", head, meta={
        "model_name": backbone, "num_classes": len(class_names), "class_names": class_names,
        "feature_dim": meta["feature_dim"], "data_config": meta.get("data_config"),
        "features": str(Path(cfg.features).resolve()), "standardize": cfg.standardize, **info})
    test = sets["test"]
    logits = predict_logits(head, test.features)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(test.labels)))
    extra = {"loss": loss, **info, "seed": t.seed, "train_seconds": train_seconds, "model": backbone,
             "head": cfg.head, "features": str(Path(cfg.features).resolve()),
             "parameters": {"total": sum(p.numel() for p in head.parameters()),
                            "trainable": sum(p.numel() for p in head.parameters())},
             "n_train": len(sets["train"]), "n_val": len(sets["val"]) if "val" in sets else 0}
    metrics = write_evaluation(run_dir, logits=logits, labels=test.labels, class_names=class_names,
                               history=read_jsonl(run_dir / "metrics.jsonl"), split="test", extra=extra,
                               image_ids=np.array(test.image_ids, dtype=np.str_))
    print(format_metrics_table(metrics, title=f"test metrics ({run_dir}; {features_path(cfg.features, 'test')})"))
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
