#!/usr/bin/env python
"""Evaluate an ensemble of finished runs or checkpoints on the same test split.

    # three seeds of one config (their predictions.npz are reused, nothing is recomputed)
    python scripts/ensemble_eval.py runs/sweep_toy_tricks/baseline/seed*
    # different architectures / PEFT adapters: checkpoints are evaluated on the test split of --data
    python scripts/ensemble_eval.py runs/a/checkpoints/best runs/b/checkpoints/best --data.format toy
    python scripts/ensemble_eval.py runs/x runs/y --methods mean_prob vote --output-dir runs/ens_xy

Members must have scored the same test images in the same order (same --data settings).
Combination rules: mean_prob, mean_logit, vote (ties to the higher mean probability) and
val_weighted (probabilities weighted by each member's validation top-1 at its best epoch).
Writes <output-dir>/ensemble.md (members, their mean and 95% interval, each ensemble, pairwise
disagreement and error correlation, oracle top-1), ensemble.json and predictions_<method>.npz.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import DataConfig, parse_config  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import command_line, default_run_name, script_main  # noqa: E402


@dataclass
class _Data:
    """The dataset checkpoints are evaluated on (``--data.*``).

    Args:
        data: As for train_classifier.py (augmentation is ignored).
    """

    data: DataConfig = field(default_factory=DataConfig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one-line errors, exit status 2, like every fgclf script
        raise UserError(message)


def parse_args(argv: Optional[list[str]]):
    from fgclf.ensemble import METHODS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("members", nargs="+", help="run directories (with predictions.npz) or checkpoint folders")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--output-dir", type=Path, default=None, help="default: runs/ensemble_<time>")
    p.add_argument("--batch-size", type=int, default=64, help="for evaluating checkpoints")
    p.add_argument("--confidence", type=float, default=0.95)
    argv = list(sys.argv[1:] if argv is None else argv)
    data_args, own = [], []
    i = 0
    while i < len(argv):  # --data.* / --config (with their values) go to the DataConfig parser
        token = argv[i]
        if token.startswith(("--data.", "--config")):
            take = 1 if "=" in token else 2
            data_args += argv[i:i + take]
            i += take
        else:
            own.append(token)
            i += 1
    args = p.parse_args(own)
    data = parse_config(_Data, data_args, prog="ensemble_eval.py", description="dataset").data
    if not 0 < args.confidence < 1:
        raise UserError("--confidence must be in (0, 1)")
    return args, data


def checkpoint_member(ckpt: Path, data_cfg: DataConfig, batch_size: int):
    """Evaluate an export folder on the test (and val, for its weight) split."""
    import numpy as np
    import torch

    from fgclf import data as fd
    from fgclf.ensemble import Member
    from fgclf.models import create_model, read_checkpoint_config, resolve_data_config

    meta = read_checkpoint_config(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(f"file:{ckpt}", num_classes=meta["num_classes"]).to(device).eval()
    records, _ = fd.load_records_from_config(data_cfg)
    if list(meta["class_names"]) != list(records.class_names):
        raise UserError(f"checkpoint {ckpt} was trained on other classes than the --data dataset")
    tf = fd.create_transform(meta.get("data_config") or resolve_data_config(model), is_training=False)

    def predict(split: str):
        ds = fd.create_dataset(records=records, split=split, transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=data_cfg.num_workers)
        out = []
        with torch.no_grad():
            for x, _ in loader:
                out.append(model(x.to(device)).float().cpu())
        return (torch.cat(out).numpy() if out else np.zeros((0, meta["num_classes"]))), ds.records

    logits, test = predict("test")
    val_logits, val = predict("val")
    val_top1 = float((val_logits.argmax(1) == np.asarray(val.labels)).mean()) if len(val.labels) else None
    name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    return Member(name, logits.astype(np.float64), np.asarray(test.labels, np.int64),
                  np.asarray(test.image_ids).astype(np.str_), list(records.class_names), val_top1)


@script_main
def main(argv: list[str] | None = None) -> int:
    args, data_cfg = parse_args(argv)
    import json

    import numpy as np

    from fgclf.ensemble import evaluate_ensemble, format_report, load_run_member
    from fgclf.utils import atomic_write_text

    members = []
    for raw in args.members:
        path = Path(raw)
        if (path / "predictions.npz").is_file():
            members.append(load_run_member(path))
        elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            members.append(checkpoint_member(path, data_cfg, args.batch_size))
        elif (path / "checkpoints" / "best" / "model.safetensors").is_file():
            members.append(checkpoint_member(path / "checkpoints" / "best", data_cfg, args.batch_size))
        else:
            raise UserError(f"{path}: neither a finished run (predictions.npz) nor a checkpoint folder")
    names = [m.name for m in members]
    for raw, m in zip(args.members, members):  # unique names for the tables: parent/name, then a number
        if names.count(m.name) > 1:
            m.name = f"{Path(raw).resolve().parent.name}/{m.name}"
    names = [m.name for m in members]
    for i, m in enumerate(members):
        if names.count(m.name) > 1:
            m.name = f"{m.name}[{i}]"
    result = evaluate_ensemble(members, args.methods, confidence=args.confidence)
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
    sys.exit(main())
