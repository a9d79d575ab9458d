#!/usr/bin/env python
"""Pipeline-parallel step time against one process, next to the theoretical bubble.

    .venv/bin/python bench/pipeline_bubble.py                          # resnet18, 64 px, batch 32, K=2
    .venv/bin/python bench/pipeline_bubble.py --model resnet50 --balance-only   # stage balance table only
    .venv/bin/python bench/pipeline_bubble.py --model vit_tiny_patch16_224 --image-size 64 --stages 2
    # on a GPU machine (NCCL), e.g. 4 stages:
    .venv/bin/python bench/pipeline_bubble.py --device cuda --stages 4 --microbatches 1 4 8 16

Every process runs its stage with one CPU thread (or one GPU); the baseline is one process with
one thread (or one GPU) running the whole model on the same batch, measured in the same run.
With K equal stages and M microbatches a step ideally takes ``1 / K`` of the baseline, divided by
the busy share ``1 - bubble``, where ``bubble = (K - 1) / (M + K - 1)``; the table prints the
measured speedup beside that ideal ``K * (1 - bubble)``. Microbatches also shrink per-call work,
which the bubble formula does not know about, so a second baseline runs the same M microbatches
in one process: the speedup against it isolates what the pipeline itself buys.

First a balance table (one process): the stages each ``pp.balance`` (params, flops, time) cuts, each
stage's share of the FLOPs and its measured forward+backward time (one thread, the smallest
microbatch), and the imbalance max/mean of the stage times, which bounds the pipeline's speedup at
``K / imbalance``. The times that judge the cuts are a second measurement, not the one the ``time``
balance was cut with.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    p.add_argument("--balance", default="time", choices=["time", "flops", "params"])
    p.add_argument("--balance-only", action="store_true", help="print the balance table and stop")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting (after 2 warm-up steps)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def _model(args):
    import timm
    import torch

    torch.manual_seed(0)
    kwargs = {"img_size": args.image_size} if "vit" in args.model else {}
    return timm.create_model(args.model, num_classes=10, **kwargs)


def _batch(args):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g),
            torch.randint(0, 10, (args.batch_size,), generator=g))


def _time_steps(step, steps: int, sync) -> list[float]:
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, args, init_file: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist

    from fgclf.pipeline import build_runner

    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=args.stages)
    x, y = _batch(args)
    rows = []
    for m in args.microbatches:
        model = _model(args).train()
        sample = torch.randn(2, 3, args.image_size, args.image_size)
        costs = None
        if args.balance == "time":  # measured on rank 0 at the microbatch size and shared: every rank cuts alike
            from fgclf.pipeline import sequential_units, unit_costs

            timing = torch.randn(args.batch_size // m, 3, args.image_size, args.image_size)
            box = [unit_costs(sequential_units(model), timing, "time") if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            costs = box[0]
        runner, bounds, _ = build_runner(model, sample=sample, num_stages=args.stages, stage_index=rank,
                                         microbatches=m, schedule=args.schedule, balance=args.balance,
                                         loss_fn=torch.nn.functional.cross_entropy, device=device, costs=costs)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

        def step():
            runner.step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()

        rows.append({"microbatches": m, "times": _time_steps(step, args.steps, sync), "bounds": bounds})
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def balance_table(args) -> list[dict]:
    """Per balance: the cut, each stage's FLOP share and measured ms, and max/mean of the stage times."""
    import torch

    from fgclf.pipeline import BALANCE, partition, sequential_units, unit_costs

    torch.set_num_threads(1)
    model = _model(args).train()
    units = sequential_units(model)
    x = torch.randn(args.batch_size // max(args.microbatches), 3, args.image_size, args.image_size)
    flops = unit_costs(units, x, "flops")
    costs = {"params": unit_costs(units, x, "params"), "flops": flops, "time": unit_costs(units, x, "time")}
    judge = unit_costs(units, x, "time")  # a second measurement: the yardstick for every cut
    rows = []
    for balance in BALANCE[::-1]:
        bounds = partition(costs[balance], args.stages)
        ms = [sum(judge[a:b]) * 1e3 for a, b in zip(bounds, bounds[1:])]
        share = [sum(flops[a:b]) / sum(flops) for a, b in zip(bounds, bounds[1:])]
        rows.append({"balance": balance, "bounds": bounds, "ms": ms, "flop_share": share,
                     "imbalance": max(ms) / (sum(ms) / len(ms))})
    return rows


def print_balance_table(args, rows: list[dict]) -> None:
    k = args.stages
    print(f"\n{args.model} @ {args.image_size}px, microbatch {args.batch_size // max(args.microbatches)}, {k} stages, "
          "one thread; stage times from a second measurement\n")
    print("| pp.balance | cut (units) | FLOP share per stage | ms per stage (fwd+bwd) | imbalance max/mean | "
          "speedup bound K/imbalance |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['balance']} | {r['bounds']} | {' / '.join(f'{s:.0%}' for s in r['flop_share'])} | "
              f"{' / '.join(f'{m:.1f}' for m in r['ms'])} | {r['imbalance']:.2f} | {k / r['imbalance']:.2f}x |")
    base = rows[0]["imbalance"]
    print("\nslowest stage against params balance: " + ", ".join(
        f"{r['balance']} {max(r['ms']) / max(rows[0]['ms']):.2f}x" for r in rows[1:])
        + f" (params imbalance {base:.2f})")


def baseline(args, microbatches: int = 1) -> list[float]:
    """One process (one thread / one GPU), the whole model, the batch in ``microbatches`` pieces."""
    import torch

    torch.set_num_threads(1)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    model = _model(args).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = (t.to(device) for t in _batch(args))

    def step():
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            (torch.nn.functional.cross_entropy(model(xm), ym) / microbatches).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, args.steps, torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


def main(argv=None) -> int:
    import torch
    import torch.multiprocessing as mp

    from fgclf.pipeline import bubble_fraction

    args = parse_args(argv)
    bad = [m for m in args.microbatches if args.batch_size % m]
    if bad:
        print(f"error: batch size {args.batch_size} does not split into {bad} microbatches", file=sys.stderr)
        return 2
    print_balance_table(args, balance_table(args))
    if args.balance_only:
        return 0
    base = statistics.median(baseline(args))
    same_mb = {m: statistics.median(baseline(args, m)) for m in args.microbatches}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "pg"), out), nprocs=args.stages)
        rows = torch.load(out, weights_only=False)
    k = args.stages
    print(f"\n{args.model} @ {args.image_size}px, batch {args.batch_size}, {k} stages ({args.schedule}, "
          f"balance={args.balance}), {args.device}; baseline: 1 process = {base * 1e3:.1f} ms/step (median of "
          f"{args.steps})\n")
    print("| K | M | ms/step (median) | spread | 1 process, same M (ms) | speedup vs 1 process | vs 1 process, same M | "
          "bubble (K-1)/(M+K-1) | ideal K(1-bubble) | share of ideal (same M) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        med = statistics.median(r["times"])
        bubble = bubble_fraction(k, r["microbatches"])
        ideal = k * (1 - bubble)
        ref = same_mb[r["microbatches"]]
        print(f"| {k} | {r['microbatches']} | {med * 1e3:.1f} | {min(r['times']) * 1e3:.0f}-{max(r['times']) * 1e3:.0f} "
              f"| {ref * 1e3:.1f} | {base / med:.2f}x | {ref / med:.2f}x | {bubble:.2f} | {ideal:.2f}x | "
              f"{ref / med / ideal:.2f} |")
    print(f"\nstage boundaries (units): {rows[0]['bounds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
