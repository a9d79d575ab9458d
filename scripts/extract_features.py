#!/usr/bin/env python
r"""Extract frozen-backbone features of every split once, for heads trained on the cache.

    # the embedded toy dataset, offline-pretrained EfficientNet-Lite0 (the defaults)
    accelerate launch scripts/extract_features.py --output_dir runs/features/toy_lite0
    # the same images at 96 px, then a linear probe on the cached features
    accelerate launch scripts/extract_features.py --data.image_size 96 --output_dir runs/features/toy96
    python scripts/train_probe.py --features runs/features/toy96 --head linear
    # several processes shard the images (features are gathered in dataset order)
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/extract_features.py \
        --data.root /data/CUB_200_2011 --data.format cub --output_dir runs/features/cub_lite0

Runs the eval transform (resize + centre crop from the model's data config; no augmentation)
and the body in eval mode, so the features are deterministic. The features are timm's pooled
pre-logits (``forward_head(forward_features(x), pre_logits=True)``). Writes <output_dir>/:
features_{train,val,test}.safetensors (features, labels, image ids, class names) and
meta.json (model, data config, class names, feature dim, split sizes, command), last.
Flags: ``--help`` lists all; precedence is defaults < ``--config`` YAML < CLI flags.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import ExtractConfig, parse_config, to_dict  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import (broadcast_from_main, command_line, create_accelerator, default_run_name,  # noqa: E402
                           script_main, shutdown)


def validate(cfg: ExtractConfig) -> None:
    """Reject impossible values before anything heavy starts."""
    d = cfg.data
    checks = [(cfg.batch_size >= 1, "batch_size must be >= 1"),
              (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
              (0 <= d.test_fraction < 1, "data.test_fraction must be in [0, 1)"),
              (d.num_workers >= 0, "data.num_workers must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def output_dir(cfg: ExtractConfig) -> Path:
    """The feature directory, refused when it already holds features (unless ``--overwrite``)."""
    from fgclf.features import META_NAME

    name = default_run_name(cfg.data.format, cfg.model.name.split("/")[-1].replace("file:", ""))
    out = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / "features" / name
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is a file")
    if (out / META_NAME).exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds features; pass --overwrite true or choose another --output_dir")
    return out


@script_main
def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- config
    cfg = parse_config(ExtractConfig, argv, prog="extract_features.py", description=__doc__)
    validate(cfg)
    # ---------------------------------------------------------------- accelerator
    import torch
    from accelerate.utils import set_seed

    from fgclf import data as fd
    from fgclf.features import META_NAME, extract_features, features_path, save_features
    from fgclf.models import count_parameters, create_model, resolve_data_config
    from fgclf.utils import atomic_write_json, package_versions

    accelerator = create_accelerator(mixed_precision=cfg.mixed_precision, log_with=None)
    if cfg.batch_size % accelerator.num_processes:
        raise UserError(f"batch_size {cfg.batch_size} must be divisible by the {accelerator.num_processes} processes")
    out = Path(broadcast_from_main(accelerator, lambda: str(output_dir(cfg))))
    # ---------------------------------------------------------------- data + model
    records, bad = broadcast_from_main(accelerator, lambda: fd.load_records_from_config(cfg.data))
    set_seed(cfg.seed)
    m = cfg.model
    model = create_model(m.name, num_classes=0, pretrained=m.pretrained, weights=m.weights,
                         trust_remote_code=m.trust_remote_code, **m.kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data_cfg = fd.input_config_for(cfg.data, resolve_data_config(model))
    eval_tf = fd.create_transform(data_cfg, is_training=False)
    splits = {s: fd.create_dataset(records=records, split=s, transform=eval_tf, decoder=cfg.data.decoder)
              for s in ("train", "val", "test")}
    if len(splits["train"]) == 0 or len(splits["test"]) == 0:
        raise UserError("the dataset needs at least one train and one test image")
    model = model.to(accelerator.device)  # inference only: no DDP wrapper, each process runs its shard
    accelerator.print(f"features of {m.name} ({count_parameters(model)['total']:,} parameters) for train/val/test = "
                      f"{len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} images -> {out}")
    # ---------------------------------------------------------------- extract + save
    class_names = records.class_names
    done, dim, seconds = {}, None, {}
    for split, ds in splits.items():
        if len(ds) == 0:
            continue
        loader = accelerator.prepare(torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.data.num_workers, drop_last=False))
        start = time.perf_counter()
        feats, labels = extract_features(accelerator, model, loader, progress=cfg.progress, desc=split)
        seconds[split] = time.perf_counter() - start
        if len(feats) != len(ds) or labels.tolist() != list(ds.records.labels):  # a bug, not user input
            raise RuntimeError(f"{split}: gathered {len(feats)} samples for {len(ds)} images, or out of order")
        dim = feats.shape[1]
        if accelerator.is_main_process:
            save_features(features_path(out, split), feats, labels, ds.records.image_ids,
                          {"split": split, "class_names": class_names, "model_name": m.name, "feature_dim": dim})
            print(f"{split}: {feats.shape[0]} x {dim} features in {seconds[split]:.1f} s")
        done[split] = len(ds)
        del loader
    if accelerator.is_main_process:  # last: marks the directory complete
        for split in set(("train", "val", "test")) - set(done):  # no stale file from an earlier run
            features_path(out, split).unlink(missing_ok=True)
        atomic_write_json(out / META_NAME, {
            "format": "fgclf.features/1", "model_name": m.name, "model": to_dict(m), "data": to_dict(cfg.data),
            "data_config": {k: data_cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
                            if k in data_cfg},
            "class_names": class_names, "num_classes": len(class_names), "feature_dim": int(dim), "splits": done,
            "seconds": seconds, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device), "skipped_images": [p for p, _ in bad],
            "command": command_line(), "versions": package_versions()})
        print(f"wrote {out / META_NAME}")
    del model
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
