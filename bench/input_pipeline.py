#!/usr/bin/env python
"""Decode + augment throughput from JPEG files against the model's consumption rate; cache formats.

    .venv/bin/python bench/input_pipeline.py                        # 64 JPEGs of 800x600, crops 224 and 448
    .venv/bin/python bench/input_pipeline.py --sizes 448 --workers 0 1 2 --source-size 1024 768
    .venv/bin/python bench/input_pipeline.py --model resnet50 --images 128

Rows (each through a torch DataLoader, batch 32, over the same files, after one warm pass):

- ``fgclf PIL``: what ``train_classifier.py`` does by default: ``ImageDataset`` (PIL decode, RGB
  conversion) + the ``basic`` train transform (RandomResizedCrop, flip, normalise).
- ``fgclf PIL + cache``: the same with ``--data.cache true`` (``ResizedImageCache``, warm: images
  stored as JPEG 95 at the eval resize size, e.g. 512 for a 448 crop).
- ``fgclf torchvision`` (``+ cache``): the same with ``--data.decoder torchvision`` (decode_jpeg,
  then a PIL image for the same transforms).
- ``torchvision.io``: ``decode_jpeg`` on the file bytes + the same augmentation on uint8 tensors
  (torchvision transforms v2), for comparison.

The consumption rate is the model's training step (forward, backward, AdamW) on a batch of 16 at
each size, measured in the same run with all cores; ``ratio`` = pipeline images/s / model
images/s (the issue's target: >= 2 at 448 with the cache and the default worker count).

A second table compares the cache's candidate formats at each eval resize size (one thread, the
first 16 images): bytes an image on disk, encode and read (decode to a PIL RGB image) time,
PSNR against the exact resize, each as a ratio to raw RGB; and the largest pixel difference
between the PIL and torchvision decoders over all the JPEGs.
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
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--source-size", type=int, nargs=2, default=[800, 600], metavar=("W", "H"))
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per row (median)")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--model-steps", type=int, default=3)
    return p.parse_args(argv)


def make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus detail), quality 90."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    w, h = size
    paths = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        path = folder / f"{i:04d}.jpg"
        Image.blend(base, detail, 0.25).save(path, quality=90)
        paths.append(str(path))
    return paths


class TorchvisionIO:
    """decode_jpeg + v2 transforms on uint8 tensors (the same augmentation as fgclf's ``basic``)."""

    def __init__(self, paths: list[str], size: int):
        import torch
        from torchvision.transforms import v2

        self.paths = paths
        self.tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        return self.tf(decode_jpeg(read_file(self.paths[i]), mode=ImageReadMode.RGB)), 0


def data_config(size: int) -> dict:
    return {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875,
            "interpolation": "bicubic"}


def fgclf_dataset(paths: list[str], size: int, cache=None, decoder: str = "pil"):
    from fgclf.data import ImageDataset, Records, create_transform

    records = Records(items=list(paths), labels=[0] * len(paths), image_ids=[str(i) for i in range(len(paths))],
                      splits=["train"] * len(paths), class_names=["x"])
    return ImageDataset(records, create_transform(data_config(size), is_training=True, aug="basic"), cache=cache,
                        decoder=decoder)


def _best_ms(fn, items, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e3


def format_table(paths: list[str], size: int) -> None:
    """Raw RGB against the compressed formats for the cache at short side ``size`` (one thread)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from fgclf.data import load_image
    from fgclf.data.cache import encode_jpeg, resize_short_side

    def save(fmt, **kw):
        def enc(img):
            buf = io.BytesIO()
            img.save(buf, fmt, **kw)
            return buf.getvalue()
        return enc

    def pil_read(blob):
        with Image.open(io.BytesIO(blob)) as img:
            return img.convert("RGB")

    def tv_read(blob):
        from fgclf.data.decode import decode_bytes
        return decode_bytes(blob, "torchvision")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    exact = [resize_short_side(load_image(p), size, "bicubic") for p in paths[:16]]
    shapes = [(im.size[1], im.size[0], 3) for im in exact]
    raw_enc = lambda img: np.asarray(img).tobytes()  # noqa: E731
    formats = [("raw RGB (before)", raw_enc, None),
               ("JPEG 95 4:2:0 (now), PIL", encode_jpeg, pil_read),
               ("JPEG 95 4:2:0 (now), torchvision", encode_jpeg, tv_read),
               ("WebP lossless (method 0)", save("WEBP", lossless=True, method=0, quality=0), pil_read),
               ("PNG (level 1)", save("PNG", compress_level=1), pil_read)]
    print(f"\n| cache at {size} px | KB / image | encode ms | read ms | PSNR dB | size vs raw | read vs raw |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, enc, read in formats:
        start = time.perf_counter()
        blobs = [enc(im) for im in exact]
        enc_ms = (time.perf_counter() - start) / len(exact) * 1e3
        if read is None:
            idx = {id(b): i for i, b in enumerate(blobs)}
            def read(b):
                return Image.fromarray(np.frombuffer(b, np.uint8).reshape(shapes[idx[id(b)]]), "RGB")
        read_ms = _best_ms(read, blobs)
        mse = np.mean([np.mean((np.asarray(read(b), np.float64) - np.asarray(im, np.float64)) ** 2)
                       for b, im in zip(blobs, exact)])
        psnr = "exact" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f}"
        kb = np.mean([len(b) for b in blobs]) / 1024
        base = base or (kb, read_ms)
        print(f"| {name} | {kb:.0f} | {enc_ms:.1f} | {read_ms:.2f} | {psnr} | {kb / base[0]:.2f}x "
              f"| {read_ms / base[1]:.1f}x |", flush=True)
    src = _best_ms(load_image, paths[:16])
    tv = _best_ms(lambda p: load_image(p, decoder="torchvision"), paths[:16])
    worst = max(int(np.abs(np.asarray(load_image(p), np.int16) - np.asarray(load_image(p, decoder="torchvision"),
                                                                         np.int16)).max()) for p in paths)
    print(f"\nsource JPEG -> PIL image: PIL {src:.2f} ms, torchvision {tv:.2f} ms ({src / tv:.2f}x); "
          f"max |PIL - torchvision| over {len(paths)} files: {worst}")
    torch.set_num_threads(threads)


def images_per_second(dataset, *, workers: int, batch_size: int, repeats: int) -> tuple[float, list[float]]:
    """Median images/s of full passes (workers started once and kept, as persistent workers are)."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    for _ in loader:  # warm pass: worker start, caches, allocator
        pass
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), rates


def model_rate(name: str, size: int, steps: int) -> float:
    """Training images/s of the model (batch 16, AdamW) at ``size``, all cores, median of ``steps``."""
    import timm
    import torch

    model = timm.create_model(name, num_classes=200).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(16, 3, size, size), torch.randint(0, 200, (16,))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return 16 / statistics.median(times)


def main(argv=None) -> int:
    from fgclf.data.cache import ResizedImageCache, eval_resize_size

    args = parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images, tuple(args.source_size))
        print(f"\n{args.images} JPEGs of {args.source_size[0]}x{args.source_size[1]}, batch {args.batch_size}, "
              f"{cores} cores; rates are images/s (median of {args.repeats} passes)\n")
        print("| crop | pipeline | workers | images/s | passes | model images/s | ratio |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            consume = model_rate(args.model, size, args.model_steps)
            cache = ResizedImageCache(Path(tmp) / "cache", eval_resize_size(data_config(size)), "bicubic")
            rows = [("fgclf PIL", fgclf_dataset(paths, size)), ("fgclf PIL + cache", fgclf_dataset(paths, size, cache)),
                    ("fgclf torchvision", fgclf_dataset(paths, size, decoder="torchvision")),
                    ("fgclf torchvision + cache", fgclf_dataset(paths, size, cache, "torchvision")),
                    ("torchvision.io", TorchvisionIO(paths, size))]
            for label, ds in rows:
                for workers in args.workers:
                    med, rates = images_per_second(ds, workers=workers, batch_size=args.batch_size,
                                                   repeats=args.repeats)
                    print(f"| {size} | {label} | {workers} | {med:.1f} | {', '.join(f'{r:.0f}' for r in rates)} "
                          f"| {consume:.1f} | {med / consume:.1f}x |", flush=True)
        print(f"\nmodel: {args.model} training step (batch 16, AdamW, fp32, {cores} cores)")
        for size in args.sizes:
            format_table(paths, eval_resize_size(data_config(size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
