#!/usr/bin/env python
"""Predict the classes of new images with a trained model.

    python scripts/predict.py --model runs/cub_r50 photos/ --output preds.csv
    python scripts/predict.py --model runs/cub_r50/checkpoints/best a.jpg b.png list.txt --topk 3
    python scripts/predict.py --model runs/cub_r50 --data.format cub --data.root /data/CUB_200_2011 --split test
    accelerate launch --num_processes 2 scripts/predict.py --model export_dir folder/ --output preds.csv

``--model``: a run directory (its ``checkpoints/best``), a checkpoint folder or an exported model
(``config.json`` + ``model.safetensors``: any method, PEFT runs merged). Inputs: image files,
folders (recursively, sorted; other files are listed as skipped), and ``.txt`` / ``.csv`` lists of
paths (relative to the list's folder; a CSV's ``path`` column, else its first); or one split of a
dataset, ``--data.format ... --data.root ... --split test`` (any format train_classifier.py reads,
HF datasets included; rows are named by their image ids). Writes ``--output``
(CSV: path, class1, prob1, ... classK, probK), the same as JSONL beside it (``--save-logits``
adds the logits) and ``<output stem>.errors.csv`` naming every image that could not be read and
why; each file is written whole or not at all. The run's TTA (its flip, or its multi-view
``train.tta``: fgclf/tta.py) is used unless ``--tta-flip`` or ``--tta`` says otherwise. Under ``accelerate launch`` each process predicts a slice and the file keeps the
input order.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import DataConfig, parse_config  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import ArgumentParser, script_main, split_data_args  # noqa: E402


@dataclass
class _Data:
    """The dataset whose split is predicted (``--data.*`` as for train_classifier.py).

    Args:
        data: Its format, root and split settings.
    """

    data: DataConfig = field(default_factory=DataConfig)


def parse_args(argv: Optional[list[str]]):
    p = ArgumentParser(description=__doc__)
    p.add_argument("inputs", nargs="*", help="image files, folders, .txt/.csv lists of paths (or --data.*)")
    p.add_argument("--split", default="test", help="with --data.*: the split to predict (default: %(default)s)")
    p.add_argument("--model", required=True, help="run directory, checkpoint folder or exported model")
    p.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--tta-flip", choices=("auto", "true", "false"), default="auto",
                   help="average each image with its mirror image (auto: as the model's run did)")
    p.add_argument("--tta", choices=("auto", "none", "flip", "five_crop", "ten_crop", "multiscale"), default="auto",
                   help="test-time augmentation (fgclf/tta.py); auto: the run's (default: %(default)s)")
    p.add_argument("--save-logits", action="store_true", help="add the logits to the JSONL")
    p.add_argument("--progress", choices=("true", "false"), default="true")
    data_args, own = split_data_args(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(own)
    args.data = None
    if data_args:
        args.data = parse_config(_Data, data_args, prog="predict.py", description="dataset").data
    if bool(args.inputs) == (args.data is not None):
        raise UserError("give images, folders or lists to predict, or a dataset with --data.* (not both)")
    if args.tta != "auto" and args.tta_flip != "auto":
        raise UserError("give --tta or --tta-flip, not both (--tta flip is the same as --tta-flip true)")
    if args.topk < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--topk and --batch-size must be >= 1, --num-workers >= 0")
    if args.output.suffix.lower() != ".csv":
        raise UserError(f"--output must name a .csv file (the JSONL goes beside it), got {args.output}")
    return args


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from fgclf.predict import collect_inputs, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)  # user errors before torch, the model or any image is loaded
    if args.data is not None:
        from fgclf.predict import dataset_inputs

        inputs = dataset_inputs(args.data, args.split)
    else:
        inputs = collect_inputs(args.inputs)
    from accelerate import Accelerator

    from fgclf.predict import predict, write_predictions

    accelerator = Accelerator()
    flip = None if args.tta_flip == "auto" else args.tta_flip == "true"
    mode = None if args.tta == "auto" else args.tta
    pred = predict(checkpoint, inputs, batch_size=args.batch_size, num_workers=args.num_workers, tta_flip=flip,
                   accelerator=accelerator, progress=args.progress == "true", tta=mode)
    if accelerator.is_main_process:
        written = write_predictions(pred, args.output, topk=args.topk, save_logits=args.save_logits,
                                    skipped=inputs.skipped)
        done = sum(lg is not None for lg in pred.logits)
        failed = len(pred.errors) + len(inputs.skipped)
        tta = mode or (checkpoint.tta if flip is None else None) or (
            "flip" if (checkpoint.tta_flip if flip is None else flip) else "none")
        print(f"predicted {done} images with {checkpoint.path} ({'no TTA' if tta == 'none' else tta + ' TTA'}) -> "
              f"{written['csv']} and {written['jsonl']}"
              + (f"; {failed} files not predicted, listed in {written['errors']}" if failed else ""))
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
