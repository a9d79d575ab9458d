#!/usr/bin/env python
"""Evaluate an ensemble of finished runs or checkpoints on the same test split.

    # three seeds of one config (their predictions.npz are reused, nothing is recomputed)
    python scripts/ensemble_eval.py runs/sweep_toy_tricks/baseline/seed*
    # different architectures / PEFT adapters: checkpoints are evaluated on the test split of --data
    python scripts/ensemble_eval.py runs/a/checkpoints/best runs/b/checkpoints/best --data.format toy
    python scripts/ensemble_eval.py runs/x runs/y --methods mean_prob vote --output-dir runs/ens_xy

Members must have scored the same test images in the same order (same --data settings).
Combination rules: mean_prob, mean_logit, vote (ties to the higher mean probability) and
val_weighted: probabilities weighted by softmax(-L_i / T), L_i the member's validation
cross-entropy (mean negative log-likelihood per image; val/loss at its best epoch, recomputed on
the val split for a checkpoint), T = --temperature (default 0.1 nats: a member 0.1 nats/image
worse gets 1/e of the best member's weight; T -> 0 keeps the best member, large T is mean_prob).

Checkpoints are evaluated with the test-time augmentation their run used (train.tta_flip of
the run's config.yaml, or its multi-view train.tta, when the checkpoint is <run>/checkpoints/<name>; else that of the
run-directory members when they agree; else none), so a run scores the same whether it is
given as its run directory or as its checkpoint; --tta-flip true/false overrides it.
Writes <output-dir>/ensemble.md (members with their validation loss, weight and TTA, their mean
and 95% interval, each ensemble, pairwise disagreement and error correlation, oracle top-1),
ensemble.json and predictions_<method>.npz.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import DataConfig, parse_config  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import ArgumentParser, command_line, default_run_name, script_main, split_data_args  # noqa: E402,E501


@dataclass
class _Data:
    """The dataset checkpoints are evaluated on (``--data.*``).

    Args:
        data: As for train_classifier.py (augmentation is ignored).
    """

    data: DataConfig = field(default_factory=DataConfig)


def parse_args(argv: Optional[list[str]]):
    from fgclf.ensemble import DEFAULT_TEMPERATURE, METHODS

    p = ArgumentParser(description=__doc__)
    p.add_argument("members", nargs="+", help="run directories (with predictions.npz) or checkpoint folders")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--output-dir", type=Path, default=None, help="default: runs/ensemble_<time>")
    p.add_argument("--batch-size", type=int, default=64, help="for evaluating checkpoints")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="val_weighted: weights softmax(-val loss / T); T in nats per validation image "
                        f"(default {DEFAULT_TEMPERATURE})")
    p.add_argument("--tta-flip", choices=("auto", "true", "false"), default="auto",
                   help="flip TTA for checkpoint members (auto: as their run was evaluated; see above)")
    data_args, own = split_data_args(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(own)
    data = parse_config(_Data, data_args, prog="ensemble_eval.py", description="dataset").data
    if not 0 < args.confidence < 1:
        raise UserError("--confidence must be in (0, 1)")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    return args, data


def _checkpoint_run(ckpt: Path) -> Optional[Path]:
    """The run directory of ``<run>/checkpoints/<name>``, else None."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def checkpoint_member(ckpt: Path, data_cfg: DataConfig, batch_size: int, tta_flip: Optional[bool] = None):
    """Evaluate an export folder on the test split, and on val for its weight (loss and top-1).

    Args:
        tta_flip: average the logits of each image and its mirror image; ``None``: as the
            checkpoint's run did (``train.tta_flip`` of its config.yaml, or its multi-view
            ``train.tta``, averaged probabilities), else no TTA.
    """
    import numpy as np
    import torch

    from fgclf import data as fd
    from fgclf.data.mixup import tta_flip_logits
    from fgclf.ensemble import Member, run_tta, run_tta_flip
    from fgclf.models import create_model, read_checkpoint_config, resolve_data_config

    views = None
    if tta_flip is None:
        run = _checkpoint_run(ckpt)
        tta_flip = bool(run is not None and run_tta_flip(run))
        views = run_tta(run) if run is not None else None

    meta = read_checkpoint_config(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(f"file:{ckpt}", num_classes=meta["num_classes"]).to(device).eval()
    records, _ = fd.load_records_from_config(data_cfg)
    if list(meta["class_names"]) != list(records.class_names):
        raise UserError(f"checkpoint {ckpt} was trained on other classes than the --data dataset")
    tf = fd.create_transform(meta.get("data_config") or resolve_data_config(model), is_training=False)

    def predict(split: str):
        ds = fd.create_dataset(records=records, split=split, transform=tf, decoder=data_cfg.decoder)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=data_cfg.num_workers)
        out = []
        with torch.no_grad():
            for x, _ in loader:  # the same logits as fgclf.engine.evaluate, TTA included
                x = x.to(device)
                if views is not None:
                    from fgclf.tta import tta_logits

                    out.append(tta_logits(model, x, views).float().cpu())
                else:
                    out.append((tta_flip_logits(model, x) if tta_flip else model(x)).float().cpu())
        return (torch.cat(out).numpy() if out else np.zeros((0, meta["num_classes"]))), ds.records

    logits, test = predict("test")
    val_logits, val = predict("val")
    val_top1 = val_loss = None
    if len(val.labels):
        val_labels = torch.as_tensor(np.asarray(val.labels, np.int64))
        val_top1 = float((val_logits.argmax(1) == val_labels.numpy()).mean())
        # the engine's val/loss: plain cross-entropy (mean NLL per image) of the float32 logits
        val_loss = float(torch.nn.functional.cross_entropy(torch.as_tensor(val_logits), val_labels))
    name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    return Member(name, logits.astype(np.float64), np.asarray(test.labels, np.int64),
                  np.asarray(test.image_ids).astype(np.str_), list(records.class_names), val_top1,
                  val_loss, tta_flip, views)


@script_main
def main(argv: list[str] | None = None) -> int:
    args, data_cfg = parse_args(argv)
    import json

    import numpy as np

    from fgclf.ensemble import evaluate_ensemble, format_report, load_run_member
    from fgclf.utils import atomic_write_text

    from fgclf.ensemble import run_tta, run_tta_flip

    kinds: list[tuple[str, Path]] = []
    for raw in args.members:
        path = Path(raw)
        if (path / "predictions.npz").is_file():
            kinds.append(("run", path))
        elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            kinds.append(("ckpt", path))
        elif (path / "checkpoints" / "best" / "model.safetensors").is_file():
            kinds.append(("ckpt", path / "checkpoints" / "best"))
        else:
            raise UserError(f"{path}: neither a finished run (predictions.npz) nor a checkpoint folder")
    run_members = {i: load_run_member(path) for i, (kind, path) in enumerate(kinds) if kind == "run"}
    # a checkpoint outside a run directory is scored with the run-directory members' TTA when they agree
    common = {m.tta_flip for m in run_members.values() if m.tta_flip is not None}
    fallback = common.pop() if len(common) == 1 else False
    members = []
    for i, (kind, path) in enumerate(kinds):
        if kind == "run":
            members.append(run_members[i])
            continue
        tta = {"true": True, "false": False}.get(args.tta_flip)
        if tta is None:
            run = _checkpoint_run(path)
            tta = run_tta_flip(run) if run is not None else None
            tta = fallback if tta is None else tta
            if run is not None and run_tta(run):  # its run's multi-view TTA (checkpoint_member reads it)
                tta = None
        members.append(checkpoint_member(path, data_cfg, args.batch_size, tta))
    names = [m.name for m in members]
    for raw, m in zip(args.members, members):  # unique names for the tables: parent/name, then a number
        if names.count(m.name) > 1:
            m.name = f"{Path(raw).resolve().parent.name}/{m.name}"
    names = [m.name for m in members]
    for i, m in enumerate(members):
        if names.count(m.name) > 1:
            m.name = f"{m.name}[{i}]"
    result = evaluate_ensemble(members, args.methods, confidence=args.confidence, temperature=args.temperature)
    out = args.output_dir or Path("runs") / default_run_name("ensemble", str(len(members)))
    out.mkdir(parents=True, exist_ok=True)
    for method, scores in result.pop("scores").items():
        np.savez_compressed(out / f"predictions_{method}.npz", probs=scores.astype(np.float32),
                            labels=members[0].labels, class_names=np.array(members[0].class_names),
                            **({"image_ids": members[0].image_ids} if members[0].image_ids is not None else {}))
    result.update(member_paths=[str(Path(p).resolve()) for p in args.members], methods=args.methods,
                  command=command_line())
    text = format_report(result)
    atomic_write_text(out / "ensemble.json", json.dumps(result, indent=2, default=float) + "\n")
    atomic_write_text(out / "ensemble.md", text)
    print(text + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
