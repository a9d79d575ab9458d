#!/usr/bin/env python
r"""FID and KID of a folder of generated images against a real dataset split.

    # generated images in runs/gan/samples/<class_name>/*.png vs the toy dataset's test split
    python scripts/image_quality.py --fake runs/gan/samples --per-class
    # real CUB-200-2011 train split, Inception features (needs torch-fidelity + its weights)
    python scripts/image_quality.py --fake runs/gan/samples --extractor inception \
        --real-split train --data.format cub --data.root /data/CUB_200_2011

The generated folder is ImageFolder-style, ``<fake>/<class_name>/*.png``, or is listed by
``<fake>/manifest.jsonl`` (lines ``{"file": "<class_name>/x.png", "label": 3, "class_name": ...}``;
when it exists it decides which files count). Class names must be the real dataset's. Real and
generated images get the same preprocessing: resize (bicubic, shorter side) + centre crop to
``--image-size`` (default: the generated images' own size), as [0, 1] tensors; the extractor then
resizes and normalises them itself. The overall numbers compare the generated images with the real
images of the classes that were generated.

Numbers from different extractors (inception vs effnet_lite0) or different image counts are not
comparable; FID is biased upwards for small sets (KID is not). Writes ``--output`` (default
``<fake>/quality.json``) and prints a markdown table. ``--data.*`` flags (and ``--config`` YAML
for them) are those of train_classifier.py; the other flags are listed by ``--help``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import DataConfig, parse_config, to_dict  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.quality import EXTRACTORS  # noqa: E402
from fgclf.runtime import command_line, script_main  # noqa: E402

MANIFEST = "manifest.jsonl"
NOTE = ("numbers from different feature extractors are not comparable; FID also depends on the number of "
        "images (biased upwards for small sets): compare only runs with the same extractor, image size and counts")


@dataclass
class RealData:
    """The real images (``--data.*`` flags).

    Args:
        data: The real dataset, as for train_classifier.py (augmentation is ignored).
    """

    data: DataConfig = field(default_factory=DataConfig)


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, DataConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="--data.* flags: the real dataset (see train_classifier.py --help), "
                                       "default: the embedded toy dataset",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", default=None, help="folder of generated images: <fake>/<class_name>/*.png (required)")
    p.add_argument("--real-split", choices=["train", "val", "test"], default="test")
    p.add_argument("--extractor", choices=EXTRACTORS, default="auto",
                   help="auto: inception when torch-fidelity and its weights are available, else effnet_lite0")
    p.add_argument("--inception-weights", default=None, help="local torch-fidelity InceptionV3 .pth (no download)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side both real and generated images are resized + centre-cropped to (default: the "
                        "generated images' size)")
    p.add_argument("--per-class", action="store_true", help="also FID/KID of every generated class")
    p.add_argument("--kid-subset-size", type=int, default=None, help="default min(1000, n_real, n_fake)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--output", default=None, help="JSON file (default <fake>/quality.json)")
    p.add_argument("--reference", action="store_true",
                   help="also score the real train split (val when --real-split is train) against the same real "
                        "images: what real photos reach with this extractor, size and class set")
    args, rest = p.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") and not a.startswith(("--data.", "--config"))]
    if stray:
        raise UserError(f"unknown option {stray[0]} (see --help)")
    data = parse_config(RealData, rest, prog="image_quality.py", description="real dataset").data
    if args.fake is None:
        raise UserError("--fake DIR is required (a folder of generated images, <fake>/<class_name>/*.png)")
    checks = [(args.image_size is None or args.image_size >= 8, "--image-size must be >= 8"),
              (args.batch_size >= 1, "--batch-size must be >= 1"),
              (args.kid_subsets >= 1, "--kid-subsets must be >= 1"),
              (args.kid_subset_size is None or args.kid_subset_size >= 2, "--kid-subset-size must be >= 2"),
              (data.num_workers >= 0, "--data.num_workers must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args, data


def _manifest_files(fake: Path, class_names: list[str]) -> list[tuple[str, str]]:
    """``(path, class_name)`` from ``manifest.jsonl``; labels, when given, must agree with the names."""
    out = []
    for n, line in enumerate((fake / MANIFEST).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rel = entry["file"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{fake / MANIFEST} line {n}: expected a JSON object with a 'file' key") from None
        name, label = entry.get("class_name"), entry.get("label")
        if name is None and isinstance(label, int) and 0 <= label < len(class_names):
            name = class_names[label]
        if name is None:
            name = Path(rel).parts[0] if len(Path(rel).parts) > 1 else None
        if name not in class_names:
            raise UserError(f"{fake / MANIFEST} line {n}: class {name!r} (label {label}) is not a class of the real "
                            f"dataset ({', '.join(class_names[:3])}, ...)")
        if label is not None and label != class_names.index(name):
            raise UserError(f"{fake / MANIFEST} line {n}: label {label} but class {name!r} is label "
                            f"{class_names.index(name)} in the real dataset (different class order?)")
        path = fake / rel
        if not path.is_file():
            raise UserError(f"{fake / MANIFEST} line {n}: missing file {path}")
        out.append((str(path), name))
    return out


def fake_files(fake: Path, class_names: list[str]) -> list[tuple[str, str]]:
    """The generated images as ``(path, class_name)``: from the manifest, else the class folders."""
    from fgclf.data.datasets import IMAGE_EXTENSIONS

    if not fake.is_dir():
        raise UserError(f"--fake folder does not exist: {fake}")
    if (fake / MANIFEST).is_file():
        files = _manifest_files(fake, class_names)
    else:
        folders = sorted(p for p in fake.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in folders if p.name not in class_names]
        if unknown:
            raise UserError(f"class folders of {fake} that are not classes of the real dataset: "
                            f"{', '.join(unknown[:5])} (known: {', '.join(class_names[:3])}, ...)")
        files = [(str(f), d.name) for d in folders for f in sorted(d.rglob("*"))
                 if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise UserError(f"no generated images found in {fake} (expected <fake>/<class_name>/*.png)")
    return files


def markdown_table(result: dict) -> str:
    """Overall row (and one per class) of FID / KID with the extractor named."""
    lines = [f"extractor: {result['extractor']} ({result['feature_dim']}-d), images at {result['image_size']} px, "
             f"real split: {result['real']['split']}", "",
             "| classes | n_real | n_fake | FID | KID (x1e3) | KID std (x1e3) |", "|---|---:|---:|---:|---:|---:|"]
    rows = [("all", result["overall"])] + list(result.get("per_class", {}).items())
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | | | n/a (< 2 images) | | |")
        else:
            lines.append(f"| {name} | {r['n_real']} | {r['n_fake']} | {r['fid']:.3f} | {1e3 * r['kid_mean']:.3f} | "
                         f"{1e3 * r['kid_std']:.3f} |")
    return "\n".join(lines + ["", f"note: {NOTE}."])


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    # ---------------------------------------------------------------- config
    args, data_cfg = parse_args(argv)
    fake_dir = Path(args.fake)
    output = Path(args.output) if args.output else fake_dir / "quality.json"
    if output.is_dir():
        raise UserError(f"--output {output} is a directory")
    import torch
    from PIL import Image

    from fgclf import data as fd
    from fgclf.quality import (create_feature_extractor, extract_features, fid_kid_from_features,
                               per_class_from_features)
    from fgclf.utils import atomic_write_json, package_versions

    # ---------------------------------------------------------------- data
    records, _ = fd.load_records_from_config(data_cfg)
    class_names = records.class_names
    files = fake_files(fake_dir, class_names)
    if args.image_size is None:
        with Image.open(files[0][0]) as im:
            size = min(im.size)
    else:
        size = args.image_size
    # same preprocessing both sides: resize + centre crop to `size`, [0, 1] tensors (mean 0, std 1)
    tf = fd.create_transform({"input_size": (3, size, size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                              "crop_pct": 1.0, "interpolation": "bicubic"}, is_training=False)
    real_ds = fd.create_dataset(records=records, split=args.real_split, transform=tf, decoder=data_cfg.decoder)
    generated = sorted({c for _, c in files}, key=class_names.index)
    fake_rec = fd.Records([f for f, _ in files], [class_names.index(c) for _, c in files],
                          [os.path.relpath(f, fake_dir) for f, _ in files], ["test"] * len(files), class_names)
    fake_ds = fd.ImageDataset(fake_rec, tf, decoder=data_cfg.decoder)

    # ---------------------------------------------------------------- features
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = create_feature_extractor(args.extractor, device=device, inception_weights=args.inception_weights)
    print(f"{len(files)} generated images ({len(generated)} classes) vs {len(real_ds)} real {args.real_split} "
          f"images at {size} px; extractor {extractor.name} ({extractor.num_features}-d) on {device}")
    start = time.perf_counter()
    feats = {}
    for side, ds in (("real", real_ds), ("fake", fake_ds)):
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                             num_workers=data_cfg.num_workers)
        f, y = extract_features(loader, extractor=extractor, return_labels=True)
        feats[side] = {c: f[y == class_names.index(c)] for c in generated}  # real: only the generated classes
    reference = None
    if args.reference:  # real images of another split, scored like the generated ones
        ref_split = "val" if args.real_split == "train" else "train"
        ref_ds = fd.create_dataset(records=records, split=ref_split, transform=tf, decoder=data_cfg.decoder)
        loader = torch.utils.data.DataLoader(ref_ds, batch_size=args.batch_size, shuffle=False,
                                             num_workers=data_cfg.num_workers)
        f, y = extract_features(loader, extractor=extractor, return_labels=True)
        keep = torch.as_tensor([class_names[int(i)] in generated for i in y])
        reference = {"split": ref_split, **fid_kid_from_features(torch.cat(list(feats["real"].values())), f[keep],
                                                                 kid_subset_size=args.kid_subset_size,
                                                                 kid_subsets=args.kid_subsets, seed=args.seed)}
    extract_s = time.perf_counter() - start

    # ---------------------------------------------------------------- FID / KID
    kid = dict(kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets, seed=args.seed)
    if args.per_class:  # a FID per class costs an eigendecomposition each: only on request
        res = per_class_from_features(feats["real"], feats["fake"], **kid)
    else:
        res = {"overall": fid_kid_from_features(torch.cat(list(feats["real"].values())),
                                                torch.cat(list(feats["fake"].values())), **kid)}
    missing = [c for c in class_names if c not in generated]
    result = {"format": "fgclf.quality/1", "extractor": extractor.name, "feature_dim": extractor.num_features,
              "image_size": size, "fake_dir": str(fake_dir), "classes": generated, "missing_classes": missing,
              "real": {"split": args.real_split, "data": to_dict(data_cfg)}, "overall": res["overall"]}
    if args.per_class:
        result["per_class"] = res["per_class"]
    if reference is not None:
        result["reference"] = reference
    result.update({"kid_subsets": args.kid_subsets, "seed": args.seed, "note": NOTE,
                   "seconds": {"extract": extract_s, "total": time.perf_counter() - start},
                   "command": command_line(), "versions": package_versions()})
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output, result)
    print(markdown_table(result))
    if reference is not None:
        print(f"reference: real {reference['split']} images ({reference['n_fake']}) vs the same real images: "
              f"FID {reference['fid']:.3f}, KID x1e3 {1e3 * reference['kid_mean']:.3f} "
              f"(± {1e3 * reference['kid_std']:.3f})")
    if missing:
        print(f"{len(missing)} real classes have no generated images and are left out: {', '.join(missing[:5])}"
              + (", ..." if len(missing) > 5 else ""))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
