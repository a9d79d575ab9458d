#!/usr/bin/env python
"""Optimizer step time of torch's per-tensor loop, foreach and fused implementations
(``--optim.fused true``), and what the fused one changes in a whole training step.

    .venv/bin/python bench/optimizer_step.py                 # tf_efficientnet_lite0 and resnet50, adamw and sgd, CPU
    .venv/bin/python bench/optimizer_step.py --device cuda --image-size 224 --batch-size 64   # on a GPU

Each optimizer is built by fgclf's ``create_optimizer`` (its parameter groups: no weight decay on
norms and biases, the head's lr), over one model's parameters with fixed random gradients; every
implementation steps the same parameters in turn, alternating the order every repeat so drift hits
all alike. The first table gives ms per optimizer step (median over repeats, spread) and the ratio
to the implementation a run gets without ``--optim.fused`` (torch's default: the loop on CPU
tensors, foreach on CUDA), measured in the same run (median of the per-repeat ratios). The second
trains the model (forward, backward, step on one in-memory batch) with that default and the fused
AdamW, alternating, and gives images/s and the fused / default ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import train_step_rates  # noqa: E402

IMPLS = ("loop", "foreach", "fused")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "resnet50"])
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=96, help="training-step table (0: leave it out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per repeat")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    return p.parse_args(argv)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def default_impl(device) -> str:
    """What torch runs without ``fused`` or ``foreach``: foreach on CUDA tensors, else the loop."""
    return "foreach" if device.type == "cuda" else "loop"


def _optimizer(model, name: str, impl: str):
    from fgclf.optim import create_optimizer

    opt = create_optimizer(model, name=name, lr=1e-4, weight_decay=0.01, fused=impl == "fused")
    if impl != "fused":
        for group in opt.param_groups:
            group["foreach"] = impl == "foreach"
    return opt


def step_times(args, model_name: str, opt_name: str) -> dict[str, list[float]]:
    """ms per optimizer step of each implementation, per repeat."""
    import timm
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=200).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {impl: _optimizer(model, opt_name, impl) for impl in IMPLS}

    def run(impl: str, n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            opts[impl].step()
        _sync(device)
        return (time.perf_counter() - start) / n * 1e3

    for impl in IMPLS:
        run(impl, 2)  # warm-up: state allocation, kernels
    times = {impl: [] for impl in IMPLS}
    for r in range(args.repeats):
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            times[impl].append(run(impl, args.steps))
    return times


def train_rates(args, model_name: str) -> dict[str, list[float]]:
    """images/s of whole training steps with the default and the fused AdamW, per repeat."""
    import timm
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(model_name, num_classes=200)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 200, (args.batch_size,), device=device)
    setups = {}
    for impl in ("default", "fused"):
        model = copy.deepcopy(base).to(device).train()
        setups[impl] = (model, _optimizer(model, "adamw", default_impl(device) if impl == "default" else impl))

    return train_step_rates(setups, x, y, steps=args.train_steps, repeats=args.repeats, precision=args.precision)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"\n{args.device}; {args.steps} optimizer steps x {args.repeats} repeats per implementation\n")
    import torch

    default = default_impl(torch.device(args.device))
    print("| model | optimizer | implementation | ms per step (median) | spread | / default |")
    print("|---|---|---|---:|---:|---:|")
    for model_name in args.models:
        for opt_name in args.optimizers:
            times = step_times(args, model_name, opt_name)
            for impl in IMPLS:
                med = statistics.median(times[impl])
                ratios = [t / d for t, d in zip(times[impl], times[default])]
                label = f"{impl} (default)" if impl == default else impl
                print(f"| {model_name} | {opt_name} | {label} | {med:.2f} | {min(times[impl]):.2f}-"
                      f"{max(times[impl]):.2f} | {statistics.median(ratios):.2f} |", flush=True)
    if args.image_size > 0:
        print(f"\nTraining step (forward, backward, AdamW step), {args.image_size} px, batch {args.batch_size}, "
              f"precision {args.precision}; {args.train_steps} steps x {args.repeats} repeats\n")
        print("| model | AdamW | images/s (median) | spread | fused / default |")
        print("|---|---|---:|---:|---:|")
        for model_name in args.models:
            rates = train_rates(args, model_name)
            ratio = statistics.median(f / d for f, d in zip(rates["fused"], rates["default"]))
            for impl, r in rates.items():
                tail = f"{ratio:.2f}" if impl == "fused" else ""
                print(f"| {model_name} | {impl} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} | {tail} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
