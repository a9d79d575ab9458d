#!/usr/bin/env python
"""Training step with NCHW (default) against NHWC weights (``--train.channels_last true``), same run.

    .venv/bin/python bench/memory_format.py                        # tf_efficientnet_lite0 and resnet18, 128 px, batch 32
    .venv/bin/python bench/memory_format.py --models resnet50 --image-size 224 --batch-size 16
    .venv/bin/python bench/memory_format.py --device cuda --precision bf16 --image-size 224   # on a GPU

For each model both layouts train one copied initial state on the same in-memory batch (forward,
backward, AdamW), alternating NCHW / NHWC every repeat so drift hits both alike; the table gives
images/s (median, spread) and the NHWC / NCHW ratio, plus the largest weight difference between
the two after the same steps (the layout must not change the arithmetic beyond float rounding).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import train_step_rates  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "resnet18"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    return p.parse_args(argv)


def run(args, name: str) -> dict:
    import timm
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    base = timm.create_model(name, num_classes=100)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    setups = {}
    for layout in ("NCHW", "NHWC"):
        model = copy.deepcopy(base).to(device).train()
        if layout == "NHWC":
            model = model.to(memory_format=torch.channels_last)
        setups[layout] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    rates = train_step_rates(setups, x, y, steps=args.steps, repeats=args.repeats, precision=args.precision)
    a, b = (dict(setups[k][0].named_parameters()) for k in ("NCHW", "NHWC"))
    diff = max(float((a[k] - b[k]).detach().abs().max()) for k in a)
    ratios = [n / c for n, c in zip(rates["NHWC"], rates["NCHW"])]
    return {"rates": rates, "ratio": statistics.median(ratios), "diff": diff}


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"\n{args.image_size} px, batch {args.batch_size}, {args.device}, precision {args.precision}; "
          f"{args.steps} steps x {args.repeats} repeats per layout\n")
    print("| model | layout | images/s (median) | spread | NHWC / NCHW | max weight difference |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        out = run(args, name)
        for layout, rates in out["rates"].items():
            tail = f"{out['ratio']:.2f} | {out['diff']:.1e}" if layout == "NHWC" else " | "
            print(f"| {name} | {layout} | {statistics.median(rates):.1f} | {min(rates):.1f}-{max(rates):.1f} | {tail} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
