#!/usr/bin/env python
"""Training-step throughput of fgclf's engine against a bare PyTorch loop and a minimal accelerate loop.

    .venv/bin/python bench/engine_overhead.py          # tf_efficientnet_lite0, 128 px, batch 32, 20 steps x 5 repeats
    .venv/bin/python bench/engine_overhead.py --model resnet18 --repeats 7
    .venv/bin/python bench/engine_overhead.py --precision bf16         # CPU autocast for all three variants
    .venv/bin/python bench/engine_overhead.py --threads 1              # torch.set_num_threads(1) for all three

Three variants train the same model (one initial state, copied) on the same batches:

(a) ``fgclf``: the real engine path of ``scripts/train_classifier.py``: ``create_accelerator``
    (split batches, seedable sampler, TensorBoard logging into a temporary folder, trackers
    initialised), the DataLoader and model prepared by it, ``create_optimizer`` (AdamW, weight
    decay 0.01 off norms and biases, head/body groups), ``create_scheduler``, ``create_loss("ce")``
    and ``fgclf.engine.train_one_epoch`` with a ``TrainState``, ``log_every=10``, progress bars on
    (tqdm writes to os.devnull so the table stays readable) and an ``on_update`` callback like
    ``fit``'s. One call of ``train_one_epoch`` over the N batches is one timed repeat, so its
    per-epoch work (tqdm set-up, end-of-epoch loss/sample reductions) is included.
(b) ``bare``: ``model.train(); for x, y in loader: loss = F.cross_entropy(model(x), y);
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`` with ``torch.optim.AdamW``
    in the same two weight-decay groups (0.01 on weights, 0 on 1-D params and biases).
(c) ``accelerate``: accelerate's ``cv_example.py`` loop: ``Accelerator()``, ``prepare(model, opt,
    loader)``, ``accelerator.backward(loss)``, same AdamW groups, no tracking.

Data: N batches of random images and labels held in memory as one ``TensorDataset``; every
variant iterates a ``torch.utils.data.DataLoader`` over it (``num_workers=0``, no shuffle), so
all pay the same collate cost; (a) and (c) go through ``accelerator.prepare`` as the scripts
do. The lr is constant (``--scheduler constant`` by default: the engine still calls
``scheduler.step_update()`` after every update, which re-sets every group's lr, but all three
follow the same lr and so must end with the same weights). Same seed, threads and precision
for all; ``--precision bf16`` runs the forward under CPU bf16 autocast in all three (accelerate's
``mixed_precision="bf16"`` for (a) and (c), ``torch.autocast`` in (b)), loss in float32.

Each repeat runs the three variants once, N steps each, in an order rotated by one every repeat
(a b c, b c a, c a b, ...) so drift and position effects hit all alike, after ``--warmup-steps``
untimed steps per variant. The table reports images/s (median and min-max over repeats) and the
ratio to the bare loop: the median of the per-repeat ratios (each variant against the bare loop
of the same repeat). The line "same work?" gives the largest weight difference between the
variants after the run: near 0 means the three did the same arithmetic.
Acceptance (issue): engine / bare >= 0.97 on CPU (median of repeats).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.report import markdown_table  # noqa: E402

VARIANTS = ("fgclf", "bare", "accelerate")
LABELS = {"fgclf": "fgclf engine (train_one_epoch)", "bare": "bare PyTorch loop",
          "accelerate": "minimal accelerate loop (cv_example)"}
TARGET = 0.97


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm name (random init)")
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per variant before the repeats")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--scheduler", default="constant", help="fgclf schedule of (a); any other than constant "
                   "changes (a)'s lr, so its weights will no longer match (b) and (c)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """timm's rule (what fgclf.optim uses): no decay on 1-D parameters, biases and no_weight_decay()."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    worst = 0.0
    for key, ta in sa.items():
        tb = sb[key]
        if ta.is_floating_point():
            worst = max(worst, float((ta.detach().float() - tb.detach().float()).abs().max()))
        elif not bool((ta == tb).all()):
            worst = float("inf")
    return worst


def run(args: argparse.Namespace) -> dict:
    """Time the three variants; return per-variant images/s lists, the models and the setup."""
    import torch
    from accelerate import Accelerator
    from torch.nn import functional as F

    from fgclf.engine import FitOptions, TrainState, train_one_epoch
    from fgclf.losses import create_loss
    from fgclf.methods import StepParts, create_method
    from fgclf.models import create_model
    from fgclf.optim import create_optimizer, create_scheduler
    from fgclf.runtime import create_accelerator, set_run_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = create_model(args.model, num_classes=args.num_classes, pretrained=False)
    models = {v: copy.deepcopy(base) for v in VARIANTS}
    originals = dict(models)  # one process: prepare returns these very modules (no DDP wrapper to unwrap)
    del base
    gen = torch.Generator().manual_seed(args.seed)
    n_warm, n = args.warmup_steps * args.batch_size, args.steps * args.batch_size
    images = torch.randn(n_warm + n, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(0, args.num_classes, (n_warm + n,), generator=gen)

    def loader(lo: int, hi: int):
        ds = torch.utils.data.TensorDataset(images[lo:hi], labels[lo:hi])
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)

    tmp = tempfile.TemporaryDirectory(prefix="fgclf_engine_bench_")
    devnull = open(os.devnull, "w")
    try:
        # (a) fgclf: accelerator, optimizer, schedule and loss as scripts/train_classifier.py builds them
        acc_a = create_accelerator(mixed_precision=args.precision, log_with="tensorboard")
        if acc_a.num_processes > 1:
            raise SystemExit("error: run this benchmark as one process (python, not accelerate launch)")
        set_run_dir(acc_a, Path(tmp.name))
        opt_a = create_optimizer(models["fgclf"], name="adamw", lr=args.lr, weight_decay=args.weight_decay)
        sched_a = create_scheduler(opt_a, name=args.scheduler, epochs=args.repeats + 1, updates_per_epoch=args.steps)
        method_a = create_method("plain", parts=StepParts(loss_fn=create_loss("ce")))
        models["fgclf"], opt_a, dl_a, warm_a = acc_a.prepare(models["fgclf"], opt_a, loader(n_warm, n_warm + n),
                                                              loader(0, n_warm))
        acc_a.register_for_checkpointing(sched_a)
        acc_a.init_trackers("engine_overhead", config={"model": args.model})
        state = TrainState()

        def on_update(st) -> None:  # what fit() hands the engine when no step checkpoints are asked for
            for callback in ():
                callback(st)

        def step_a(dl) -> None:
            with contextlib.redirect_stderr(devnull):  # tqdm picks sys.stderr when the bar is made
                train_one_epoch(acc_a, models["fgclf"], dl, opt_a, sched_a, method_a, state=state,
                                options=FitOptions(log_every=args.log_every, progress=True), on_update=on_update)
            state.epoch += 1
            state.step_in_epoch = 0

        # (c) minimal accelerate loop
        acc_c = Accelerator(mixed_precision=args.precision)
        device = acc_c.device
        opt_c = torch.optim.AdamW(_decay_groups(models["accelerate"], args.weight_decay), lr=args.lr)
        models["accelerate"], opt_c, dl_c, warm_c = acc_c.prepare(models["accelerate"], opt_c,
                                                                  loader(n_warm, n_warm + n), loader(0, n_warm))

        def step_c(dl) -> None:
            model = models["accelerate"]
            model.train()
            for x, y in dl:
                loss = F.cross_entropy(model(x), y)
                acc_c.backward(loss)
                opt_c.step()
                opt_c.zero_grad(set_to_none=True)

        # (b) bare PyTorch loop on the same device
        model_b = models["bare"].to(device)
        opt_b = torch.optim.AdamW(_decay_groups(model_b, args.weight_decay), lr=args.lr)
        dl_b, warm_b = loader(n_warm, n_warm + n), loader(0, n_warm)
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
               else contextlib.nullcontext())

        def step_b(dl) -> None:
            model_b.train()
            for x, y in dl:
                if device.type != "cpu":
                    x, y = x.to(device), y.to(device)  # as accelerate sends prepared batches (blocking)
                with amp:
                    logits = model_b(x)
                loss = F.cross_entropy(logits.float(), y)
                loss.backward()
                opt_b.step()
                opt_b.zero_grad(set_to_none=True)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        steps = {"fgclf": (step_a, dl_a, warm_a), "bare": (step_b, dl_b, warm_b),
                 "accelerate": (step_c, dl_c, warm_c)}
        if args.warmup_steps:
            for v in VARIANTS:
                steps[v][0](steps[v][2])
            sync()
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for v in order:
                fn, dl, _ = steps[v]
                sync()
                start = time.perf_counter()
                fn(dl)
                sync()
                rates[v].append(n / (time.perf_counter() - start))
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{v} {rates[v][-1]:.1f} img/s" for v in VARIANTS),
                  flush=True)
        acc_a.end_training()
        return {"rates": rates, "models": originals, "device": str(device), "threads": torch.get_num_threads(),
                "global_step": state.global_step}
    finally:
        devnull.close()
        tmp.cleanup()


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup_steps < 0:
        print("error: --steps, --repeats and --batch-size must be >= 1, --warmup-steps >= 0", file=sys.stderr)
        return 2
    import accelerate
    import torch

    print(f"{args.model} (random init, {args.num_classes} classes) at {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats (+{args.warmup_steps} warm-up steps), precision "
          f"{args.precision}, torch {torch.__version__}, accelerate {accelerate.__version__}", flush=True)
    res = run(args)
    rates = res["rates"]
    expected_steps = args.warmup_steps + args.steps * args.repeats
    if res["global_step"] != expected_steps:  # the engine must have done every update it was given
        print(f"error: the engine counted {res['global_step']} updates, expected {expected_steps}", file=sys.stderr)
        return 1
    ratios = {v: [a / b for a, b in zip(rates[v], rates["bare"])] for v in VARIANTS}
    print(f"\ndevice {res['device']}, {res['threads']} threads; images/s over {args.repeats} repeats of "
          f"{args.steps} x {args.batch_size} images\n")
    header = ("variant", "images/s (median)", "spread (min-max)", "ratio vs bare (median)", "ratio spread")
    rows = [(LABELS[v], f"{statistics.median(rates[v]):.1f}", f"{min(rates[v]):.1f}-{max(rates[v]):.1f}",
             f"{statistics.median(ratios[v]):.3f}", f"{min(ratios[v]):.3f}-{max(ratios[v]):.3f}") for v in VARIANTS]
    print(markdown_table(header, rows))
    engine = statistics.median(ratios["fgclf"])
    print(f"\nengine / bare = {engine:.2f} (target >= {TARGET}; median of {args.repeats} per-repeat ratios, "
          f"ratio of medians {statistics.median(rates['fgclf']) / statistics.median(rates['bare']):.2f})"
          f" -> {'meets' if engine >= TARGET else 'misses'} the target")
    vs_acc = statistics.median([a / c for a, c in zip(rates["fgclf"], rates["accelerate"])])
    print(f"accelerate / bare = {statistics.median(ratios['accelerate']):.2f}; engine / accelerate = {vs_acc:.2f}")
    models = res["models"]
    print(f"same work? max |dW| after the run: fgclf vs bare = {_max_diff(models['fgclf'], models['bare']):.2e}, "
          f"accelerate vs bare = {_max_diff(models['accelerate'], models['bare']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
