#!/usr/bin/env python
"""Linear probe on cached features vs through the frozen body every epoch (same head, same batches).

    .venv/bin/python bench/cached_probe.py                     # toy data, EfficientNet-Lite0 at 96 px, 5 epochs
    .venv/bin/python bench/cached_probe.py --epochs 10         # ~6 min on 2 busy cores
    .venv/bin/python bench/cached_probe.py --image-size 64

(a) ``cached``: features of the train and test images are extracted once
    (``fgclf.features.extract_features``), then the head trains on the feature tensor.
(b) ``images``: what ``train_classifier.py --model.strategy linear_probe`` does: every epoch
    decodes and transforms the images and runs the frozen body (eval mode) before the head.

Both use the eval transform (no augmentation: that is what caching gives up), the same
zero-initialised head, AdamW settings and per-epoch minibatch order, so they should end with
the same head up to float noise. Prints a table of seconds per epoch, the one-time extraction
cost, test top-1 of both and the ratios, measured in the same run on the same machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.report import markdown_table  # noqa: E402

MODEL = "tf_efficientnet_lite0.pypi_in1k"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the image path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def batches(perm, batch_size: int) -> list[list[int]]:
    return [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from torch import nn
    from torch.nn import functional as F

    from fgclf import data as fd
    from fgclf.features import extract_features
    from fgclf.models import create_model, resolve_data_config
    from fgclf.runtime import create_accelerator
    from fgclf.transfer import apply_strategy, init_head

    torch.manual_seed(args.seed)
    records = fd.load_records(format="toy", toy_params=dict(image_size=96))
    num_classes = len(records.class_names)
    model = create_model(MODEL, num_classes=num_classes, pretrained=True)
    init_head(model, "zero")
    train_mode = apply_strategy(model, "linear_probe")
    data_cfg = fd.resolve_input_config(resolve_data_config(model), args.image_size)
    tf = fd.create_transform(data_cfg, is_training=False)
    train_ds = fd.create_dataset(records=records, split="train", transform=tf)
    test_ds = fd.create_dataset(records=records, split="test", transform=tf)
    gen = torch.Generator().manual_seed(args.seed)
    orders = [batches(torch.randperm(len(train_ds), generator=gen), args.batch_size) for _ in range(args.epochs)]
    print(f"{MODEL} at {args.image_size} px, toy data: {num_classes} classes, {len(train_ds)} train / "
          f"{len(test_ds)} test images, {args.epochs} epochs of batch {args.batch_size}, AdamW lr {args.lr}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def loader(ds, **kw):
        return torch.utils.data.DataLoader(ds, num_workers=args.num_workers, **kw)

    def adamw(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    # ------------------------------------------------------------ (a) extract once, train on features
    accelerator = create_accelerator(log_with=None)
    start = time.perf_counter()
    train_x, train_y = extract_features(accelerator, model, loader(train_ds, batch_size=64))
    test_x, test_y = extract_features(accelerator, model, loader(test_ds, batch_size=64))
    extract_s = time.perf_counter() - start
    train_x, train_y, test_x = torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x)
    head = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = adamw(head.parameters())
    cached_epochs = []
    for order in orders:
        start = time.perf_counter()
        head.train()
        for idx in order:
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cached_epochs.append(time.perf_counter() - start)
    with torch.no_grad():
        cached_logits = head(test_x)
    cached_top1 = float((cached_logits.argmax(1).numpy() == test_y).mean())

    # ------------------------------------------------------------ (b) frozen body every epoch
    opt = adamw([p for p in model.parameters() if p.requires_grad])
    image_epochs = []
    for epoch, order in enumerate(orders, start=1):
        start = time.perf_counter()
        train_mode(model)  # body in eval mode, head in train mode (linear_probe)
        for images, labels in loader(train_ds, batch_sampler=order):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        image_epochs.append(time.perf_counter() - start)
        print(f"  images epoch {epoch}: {image_epochs[-1]:.2f} s", flush=True)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        image_logits = torch.cat([model(x) for x, _ in loader(test_ds, batch_size=64)])
    test_eval_s = time.perf_counter() - start
    image_top1 = float((image_logits.argmax(1).numpy() == test_y).mean())

    # ------------------------------------------------------------ table
    per_a, per_b = statistics.median(cached_epochs), statistics.median(image_epochs)
    total_a, total_b = extract_s + sum(cached_epochs), sum(image_epochs) + test_eval_s
    rows = [("cached features (a)", f"{extract_s:.2f}", f"{per_a * 1e3:.2f} ms", f"{total_a:.1f}",
             f"{cached_top1:.4f}"),
            ("images, frozen body (b)", "-", f"{per_b * 1e3:.0f} ms", f"{total_b:.1f}", f"{image_top1:.4f}")]
    header = ("method", "extract train+test (s)", "train time / epoch (median)", f"total {args.epochs} ep + test (s)",
              "test top1")
    print()
    print(markdown_table(header, rows))
    print(f"\nper-epoch ratio (b)/(a): {per_b / per_a:,.0f}x; total ratio incl. extraction: {total_b / total_a:.1f}x; "
          f"extraction = {extract_s / per_b:.2f} image epochs")
    head_b = model.get_classifier()
    diff_w = float((head_b.weight - head.weight).detach().abs().max())
    diff_logits = float((image_logits - cached_logits).abs().max())
    agree = float((image_logits.argmax(1) == cached_logits.argmax(1)).float().mean())
    print(f"same head? max |dW| = {diff_w:.2e}, max |d logits| on test = {diff_logits:.2e}, "
          f"predictions agree on {agree:.1%} of test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
