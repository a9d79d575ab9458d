#!/usr/bin/env python
r"""Model accounting: a torchsummary-style layer table, exact parameter totals, and the training
memory of a model, estimated from the architecture (and measured with --measure).

    python scripts/model_summary.py --model resnet18 --num-classes 200 --input-size 224 --batch-size 8
    python scripts/model_summary.py --model resnet18 --num-classes 200 --strategy linear_probe --measure
    python scripts/model_summary.py --model vit_tiny_patch16_224 --peft lora --batch-size 16 --measure
    python scripts/model_summary.py --model resnet18 --rows torchsummary --batch-size 1   # torchsummary's rows

Weights are random unless --pretrained (which needs the hub cache or an offline model name);
counts and memory do not depend on them. --input-size defaults to the model's own input size.
--measure runs --steps real training steps in a fresh process (CPU: peak RSS with the live
allocator; CUDA: max_memory_allocated) and prints the estimate / measured ratio. Conventions and
where the numbers differ from torchsummary: fgclf/models/_summary.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.errors import UserError  # noqa: E402
from fgclf.models import apply_peft, create_model, list_peft_methods, resolve_data_config  # noqa: E402
from fgclf.models._summary import (  # noqa: E402
    OPTIMIZER_STATES, PRECISION_BYTES, ROW_MODES, estimate_training_memory, format_memory, format_summary,
    measure_training_memory, summarize_model,
)
from fgclf.runtime import script_main  # noqa: E402
from fgclf.transfer import apply_strategy  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="any create_model name (timm, offline, file:DIR)")
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs them offline)")
    p.add_argument("--peft", choices=list_peft_methods(), default=None)
    p.add_argument("--lora-r", type=int, default=8, help="PEFT rank")
    p.add_argument("--strategy", choices=["full", "linear_probe"], default="full")
    p.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adamw")
    p.add_argument("--precision", choices=list(PRECISION_BYTES), default="fp32",
                   help="for the estimate (--measure runs fp32)")
    p.add_argument("--rows", choices=ROW_MODES, default="leaf", help="leaf modules, or torchsummary's rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", action="store_true", help="also run real steps and measure the peak")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for --measure")
    p.add_argument("--allocator", choices=["live", "default"], default="live", help="CPU --measure only")
    return p.parse_args(argv)


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.peft and args.strategy == "linear_probe":
        raise UserError("--peft and --strategy linear_probe exclude each other (PEFT already freezes the body)")
    if args.batch_size < 1 or args.num_classes < 1:
        raise UserError("--batch-size and --num-classes must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here")

    # ---- model: factory, then the transfer strategy or PEFT, as train_classifier.py does
    model = create_model(args.model, num_classes=args.num_classes, pretrained=args.pretrained)
    train_mode = apply_strategy(model, args.strategy)
    side = args.input_size
    input_size = (3, side, side) if side else tuple(resolve_data_config(model)["input_size"])
    if args.peft:
        model = apply_peft(model, method=args.peft, r=args.lora_r)
    train_mode(model)  # linear_probe keeps the frozen body in eval mode: that changes what is saved
    model.to(args.device)

    # ---- table and totals
    summary = summarize_model(model, input_size=input_size, batch_size=args.batch_size, rows=args.rows)
    print(f"{args.model}, {args.num_classes} classes, input {list(input_size)}, "
          f"{args.peft or args.strategy}")
    print(format_summary(summary))

    # ---- training memory (measure_training_memory makes its own fp32 estimate)
    if args.measure:
        measured = measure_training_memory(model, input_size=input_size, batch_size=args.batch_size,
                                           optimizer=args.optimizer, steps=args.steps, threads=args.threads,
                                           allocator=args.allocator)
        print(format_memory(measured["estimate"], measured))
    if not args.measure or args.precision != "fp32":
        print(format_memory(estimate_training_memory(model, input_size=input_size, batch_size=args.batch_size,
                                                     optimizer=args.optimizer, precision=args.precision)))
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
