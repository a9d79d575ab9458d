#!/usr/bin/env python
r"""Generate a labelled synthetic dataset from a train_gan.py generator.

    python scripts/generate.py --generator runs/gan_toy --output_dir runs/synthetic/toy --per_class 100
    # keep only images a trained classifier assigns to their class with probability >= 0.5
    python scripts/generate.py --generator runs/gan_toy --output_dir runs/synthetic/toy_f \
        --classifier runs/toy_finetune --threshold 0.5
    # an unconditional DCGAN: labels come from the classifier (pseudo-labels)
    python scripts/generate.py --generator runs/dcgan_toy --output_dir runs/synthetic/dc \
        --classifier runs/toy_finetune --threshold 0.5

How images get labels: a class-conditional generator (cdcgan, diffusion) is asked for a class,
so every image's label is its conditioning class. An unconditional DCGAN cannot be asked for a
class; its images get the classifier's prediction as a pseudo-label (``pseudo_label: true``
in the manifest), which is only as good as that classifier.

Writes <output_dir>/ as an ImageFolder (``<class name>/<class index>_<n>.png``, loadable with
``--data.format imagefolder``) plus manifest.jsonl (one line per kept image: file, label, class
name, generator, seed and noise index, sampler settings, classifier score, pseudo_label),
generator.json (the generator's settings and the ids of the images it was trained on, which
train_classifier.py --synthetic.dir checks against its own splits) and summary.json (generated
and kept per class). The folder appears only when complete.
Flags: ``--help`` lists all; precedence is defaults < ``--config`` YAML < CLI flags.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import GenerateConfig, parse_config, to_dict  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import command_line, script_main  # noqa: E402

MANIFEST = "manifest.jsonl"


def validate(cfg: GenerateConfig) -> None:
    checks = [(cfg.generator is not None, "--generator is required (a train_gan.py run directory)"),
              (cfg.output_dir is not None, "--output_dir is required"),
              (cfg.per_class >= 1, "per_class must be >= 1"),
              (cfg.batch_size >= 1, "batch_size must be >= 1"),
              (0.0 <= cfg.threshold <= 1.0, "threshold must be in [0, 1]"),
              (cfg.threshold == 0 or cfg.classifier is not None, "--threshold needs --classifier"),
              (cfg.sample_steps is None or cfg.sample_steps >= 1, "sample_steps must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists; pass --overwrite true or choose another --output_dir")
    if out.exists() and not (out / MANIFEST).is_file():  # --overwrite replaces generated datasets only
        raise UserError(f"{out} exists and is not a generated dataset (no {MANIFEST}); choose another --output_dir")


def select_classes(requested: list[str] | None, class_names: list[str]) -> list[int]:
    """Class indices from names or 0-based indices (all when None)."""
    if not requested:
        return list(range(len(class_names)))
    out = []
    for item in requested:
        if item in class_names:
            out.append(class_names.index(item))
        elif str(item).isdigit() and int(item) < len(class_names):
            out.append(int(item))
        else:
            from fgclf.registry import unknown_name_message

            raise UserError(unknown_name_message("class", str(item), class_names))
    return sorted(set(out))


def classifier_splits(directory: Path) -> dict:
    """The image ids a filter classifier trained (train) and chose its checkpoint (val) on, from its
    run directory's splits.json; train_classifier.py --synthetic.dir checks them against its splits."""
    run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else directory
    path = run_dir / "splits.json"
    if not path.is_file():
        raise UserError(f"cannot tell which images the classifier in {directory} was trained on (no {path}); "
                        "pass a train_classifier.py run directory or its checkpoints/best folder")
    splits = json.loads(path.read_text())
    return {"train": list(splits.get("train", [])), "val": list(splits.get("val", []))}


def load_classifier(path: str, class_names: list[str], device):
    """A train_classifier.py export (or run directory) and its eval transform; classes must match."""
    from fgclf import data as fd
    from fgclf.models import create_model, read_checkpoint_config

    directory = Path(path)
    if (directory / "checkpoints" / "best" / "config.json").is_file():
        directory = directory / "checkpoints" / "best"
    meta = read_checkpoint_config(directory)
    if list(meta.get("class_names") or []) != list(class_names):
        raise UserError(f"the classifier in {directory} was trained on other classes than the generator "
                        f"({len(meta.get('class_names') or [])} vs {len(class_names)} classes, or another order)")
    model = create_model(f"file:{directory}", num_classes=meta["num_classes"]).to(device).eval()
    data_config = meta.get("data_config") or {}
    if not data_config:
        from fgclf.models import resolve_data_config

        data_config = resolve_data_config(model)
    return model, fd.create_transform(data_config, is_training=False), directory.resolve()


@script_main
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GenerateConfig, argv, prog="generate.py", description=__doc__)
    validate(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # generation is cheap: one process writes the dataset
        return 0
    import numpy as np
    import torch
    from PIL import Image

    from fgclf.gan import generate_images, load_generator, resolve_generator_dir, sample_noise, to_uint8
    from fgclf.utils import atomic_write_json, atomic_write_text, package_versions, replace_dir

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen_dir = resolve_generator_dir(cfg.generator)
    generator, meta = load_generator(gen_dir, device=device)
    spec, class_names = meta["spec"], list(meta["class_names"])
    conditional = spec["num_classes"] > 0
    if not conditional and cfg.classifier is None:
        raise UserError("an unconditional generator's images get labels only from a classifier: pass --classifier "
                        "(a train_classifier.py run); its predictions become pseudo-labels")
    if cfg.sample_steps is not None and spec["arch"] != "diffusion":
        raise UserError("--sample_steps applies to diffusion generators only")
    if cfg.sample_steps is not None and cfg.sample_steps > spec["diffusion_steps"]:
        raise UserError(f"--sample_steps {cfg.sample_steps} exceeds the generator's {spec['diffusion_steps']} "
                        "training noise levels")
    wanted = select_classes(cfg.classes, class_names)
    classifier = transform = classifier_dir = filter_splits = None
    if cfg.classifier is not None:
        classifier, transform, classifier_path = load_classifier(cfg.classifier, class_names, device)
        filter_splits = classifier_splits(classifier_path)
        classifier_dir = str(classifier_path)
    # ---------------------------------------------------------------- generate
    total = cfg.per_class * len(wanted)
    noise = sample_noise(spec, total, seed=cfg.seed)
    labels = torch.tensor(wanted).repeat_interleave(cfg.per_class) if conditional else None
    images = to_uint8(generate_images(generator, spec, noise, labels, batch_size=cfg.batch_size,
                                      steps=cfg.sample_steps))
    pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    scores = pseudo = None
    if classifier is not None:
        probs = []
        with torch.no_grad():
            for start in range(0, total, cfg.batch_size):
                x = torch.stack([transform(p) for p in pils[start:start + cfg.batch_size]]).to(device)
                probs.append(torch.softmax(classifier(x).float(), dim=1).cpu())
        probs = torch.cat(probs).numpy()
        if conditional:
            scores = probs[np.arange(total), labels.numpy()]
        else:
            pseudo = probs.argmax(1)
            scores = probs.max(1)
    final_labels = labels.numpy() if conditional else pseudo
    keep = np.ones(total, bool) if scores is None else scores >= cfg.threshold
    if not conditional and cfg.classes:  # pseudo-labels outside the requested classes are dropped
        keep &= np.isin(final_labels, wanted)
    # ---------------------------------------------------------------- write (temp folder, then rename)
    out = Path(cfg.output_dir)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counters: dict[int, int] = {}
    lines, summary = [], {}
    sampler = {"sample_steps": cfg.sample_steps or spec.get("sample_steps"), "sampler": "ddim, eta 0"} \
        if spec["arch"] == "diffusion" else {}
    for i in range(total):
        label = int(final_labels[i])
        name = class_names[label]
        entry = summary.setdefault(name, {"generated": 0, "kept": 0})
        entry["generated"] += 1
        if not keep[i]:
            continue
        entry["kept"] += 1
        n = counters[label] = counters.get(label, -1) + 1
        rel = f"{name}/{label:03d}_{n:05d}.png"
        (tmp / name).mkdir(exist_ok=True)
        pils[i].save(tmp / rel)
        lines.append({"file": rel, "label": label, "class_name": name, "generator": str(gen_dir.resolve()),
                      "arch": spec["arch"], "seed": cfg.seed, "noise_index": i, **sampler,
                      "score": None if scores is None else float(scores[i]), "pseudo_label": not conditional,
                      "classifier": classifier_dir, "threshold": cfg.threshold})
    atomic_write_text(tmp / MANIFEST, "".join(json.dumps(line) + "\n" for line in lines))
    atomic_write_json(tmp / "generator.json", {
        **{k: meta.get(k) for k in ("spec", "class_names", "data", "epoch", "ema", "seed", "n_train", "train_image_ids")},
        "classifier": classifier_dir, "classifier_splits": filter_splits})
    atomic_write_json(tmp / "summary.json", {
        "generated": total, "kept": int(keep.sum()), "per_class": summary, "threshold": cfg.threshold,
        "classifier": classifier_dir, "pseudo_labels": not conditional, "generator": str(gen_dir.resolve()),
        "config": to_dict(cfg), "command": command_line(), "versions": package_versions()})
    replace_dir(tmp, out)  # the old folder stays readable until the new one is complete
    print(f"{int(keep.sum())} of {total} images kept in {out}" + (f" (threshold {cfg.threshold})" if scores is not None
                                                                  else ""))
    for name, entry in summary.items():
        print(f"  {name}: {entry['kept']}/{entry['generated']}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
