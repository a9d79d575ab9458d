#!/usr/bin/env python
"""What a fine-grained method costs per training step and per prediction, against ``plain``, same run.

    .venv/bin/python bench/method_cost.py                          # Lite0 (random init), 96 px, batch 32, CPU
    .venv/bin/python bench/method_cost.py --methods plain wsdan --image-size 448 --batch-size 16 --device cuda

Every method wraps the same backbone with its paper's options (the toy methods sweep's), trains on one
in-memory batch with AdamW through its own ``training_step`` (all its forward passes and optimizer
steps: PMG takes four) and predicts in eval mode (WS-DAN/CAL add crops, NTS-Net re-encodes its parts;
PIM/HERBS run an FPN over four stages).
Methods alternate every repeat so drift hits them alike; the table gives the median milliseconds of a
training step and of a prediction and their ratios against ``plain`` measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CNN = ["plain", "bcnn", "cbp", "isqrt_cov", "wsdan", "cal", "pmg", "api_net", "nts_net", "pim", "herbs"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--methods", nargs="+", default=CNN)
    p.add_argument("--num-classes", type=int, default=12)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build(args, name: str):
    import timm
    import torch

    from fgclf.methods import StepParts, create_method, method_class

    torch.manual_seed(0)
    sized = {"image_size": args.image_size} if "image_size" in method_class(name).requires else {}  # PIM, HERBS
    method = create_method(name, parts=StepParts(), **sized)
    backbone = timm.create_model(args.model, num_classes=args.num_classes)
    model = backbone if name == "plain" else method.build(backbone, args.num_classes)
    model = model.to(args.device)
    return method, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def run(args) -> list[dict]:
    import torch

    from fgclf.methods import StepContext

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    k = 4  # API-Net's P x K batches: K images of each class
    y = (torch.arange(args.batch_size) // k % args.num_classes).to(device)
    setups = {name: build(args, name) for name in args.methods}
    train_ms = {name: [] for name in args.methods}
    eval_ms = {name: [] for name in args.methods}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(name: str, n: int) -> float:
        method, model, opt = setups[name]
        model.train()
        ctx = StepContext(seed=0)
        sync()
        start = time.perf_counter()
        for i in range(n):
            ctx.start_batch(i, i)
            for substep in range(method.substeps):
                ctx.substep = substep
                out = method.training_step(model, (x, y), ctx)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - start) / n * 1000

    @torch.no_grad()
    def predict(name: str, n: int) -> float:
        method, model, _ = setups[name]
        model.eval()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            method.predict(model, x)
        sync()
        return (time.perf_counter() - start) / n * 1000

    for name in args.methods:  # warm-up
        train(name, 1)
        predict(name, 1)
    for _ in range(args.repeats):
        for name in args.methods:
            train_ms[name].append(train(name, args.steps))
            eval_ms[name].append(predict(name, args.steps))
    rows = []
    for name in args.methods:
        _, model, _ = setups[name]
        rows.append({"method": name, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "train_ms": statistics.median(train_ms[name]), "eval_ms": statistics.median(eval_ms[name])})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from fgclf.report import markdown_table

    rows = run(args)
    base = next((r for r in rows if r["method"] == "plain"), rows[0])
    print(f"{args.model} (random init), {args.image_size} px, batch {args.batch_size}, {args.device}; "
          f"median of {args.repeats} repeats x {args.steps} steps")
    print(markdown_table(["method", "trainable params", "train ms/step", "vs plain", "predict ms/batch", "vs plain"],
                         [[r["method"], f"{r['trainable']:,}", f"{r['train_ms']:.0f}",
                           f"{r['train_ms'] / base['train_ms']:.2f}x", f"{r['eval_ms']:.0f}",
                           f"{r['eval_ms'] / base['eval_ms']:.2f}x"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
