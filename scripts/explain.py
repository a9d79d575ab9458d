#!/usr/bin/env python
"""Class activation maps of a trained model: why it predicts what it predicts.

    # the run's most confused class pairs: one test image each, maps of the predicted and the true class
    python scripts/explain.py --model runs/cub_r50 --confused 6 --output confused.png
    # chosen images: maps of the two classes the model ranks first
    python scripts/explain.py --model runs/cub_r50/checkpoints/best a.jpg b.jpg --output maps.png --cam finercam
    # a ViT: attention rollout; a method's own picture (WS-DAN/CAL attention and crop, TransFG's,
    # NTS-Net's, PIM's or HERBS' selected parts)
    python scripts/explain.py --model runs/cub_vit --confused 6 --cam rollout --output rollout.png
    python scripts/explain.py --model runs/cub_wsdan --confused 6 --cam method --output wsdan.png

Maps (``--cam``): ``gradcam`` (default), ``gradcam++``, ``hirescam``, ``eigencam`` and ``finercam``
(Finer-CAM: the class's evidence minus that of its most similar classes, for fine-grained
confusions; all but ``gradcam``, fgclf's own, through the ``grad-cam`` package), on the last stage of a CNN or the last block of a
ViT (for a method's model: of its backbone; TransFG: the last block over the whole grid), over
the images as the model sees them (its eval resize and crop). A method that runs the backbone
more than once per image (WS-DAN, CAL, NTS-Net) is explained by its first pass, the whole image.
``rollout``: attention rollout of a ViT (Abnar & Zuidema 2020; ``--head-fusion``), one map per
image, the same for every class. ``method``: the picture the run's method draws (what it attends
to, crops or selects), for the methods that draw one. ``--confused`` reads the run's
``predictions.npz`` and its dataset (config.yaml's ``data`` section, so the dataset must be where
the run found it). ``--model`` may also be an adapter export (``export.py --format adapter``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import ArgumentParser, script_main  # noqa: E402

CAMS = ("gradcam", "gradcam++", "hirescam", "eigencam", "finercam")
MAPS = (*CAMS, "rollout", "method")


def parse_args(argv: Optional[list[str]]):
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="*", help="images to explain (or --confused)")
    p.add_argument("--model", required=True, help="run directory, checkpoint folder or export")
    p.add_argument("--confused", type=int, default=0, help="explain the run's N most confused class pairs")
    p.add_argument("--cam", choices=MAPS, default="gradcam",
                   help="class activation map, ViT attention rollout or the method's own picture (default: %(default)s)")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default=None,
                   help="--cam rollout: how the heads of a layer are combined (default: mean)")
    p.add_argument("--output", type=Path, default=Path("maps.png"), help="PNG grid to write (default: %(default)s)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if bool(args.images) == bool(args.confused):
        raise UserError("give images to explain or --confused N (not both)")
    if args.confused < 0:
        raise UserError("--confused must be >= 1")
    if args.head_fusion is not None and args.cam != "rollout":
        raise UserError("--head-fusion is an option of --cam rollout")
    if args.output.suffix.lower() != ".png":
        raise UserError(f"--output must name a .png file, got {args.output}")
    return args


def _run_of(checkpoint) -> Path:
    run = checkpoint.path.parent.parent if checkpoint.path.parent.name == "checkpoints" else None
    if run is None or not (run / "predictions.npz").is_file() or not (run / "config.yaml").is_file():
        raise UserError("--confused needs a finished run directory (predictions.npz, config.yaml) as --model")
    return run


def _drawing_method(meta: dict):
    """The run's method, when it draws a picture of its own (a UserError otherwise)."""
    from fgclf.methods import create_method, list_methods, method_class

    stored = meta.get("method") or {"name": "plain", "options": {}}
    drawing = [m for m in list_methods() if hasattr(method_class(m), "draw")]
    if not hasattr(method_class(stored["name"]), "draw"):
        raise UserError(f"--cam method: method {stored['name']} draws no maps of its own (those that do: "
                        f"{', '.join(drawing)}); use --cam gradcam or rollout")
    return create_method(stored["name"], **stored.get("options", {}))


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from fgclf.predict import collect_inputs, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    paths = collect_inputs(args.images).paths if args.images else None
    run = _run_of(checkpoint) if args.confused else None
    meta = checkpoint.config
    method = _drawing_method(meta) if args.cam == "method" else None
    import torch

    from fgclf.data import create_transform
    from fgclf.data.datasets import load_image
    from fgclf.explain import _vit_backbone, attention_rollout, class_maps, displayable, most_confused, save_grid

    names = list(meta.get("class_names") or range(meta["num_classes"]))
    model = checkpoint.load_model()
    if args.cam == "rollout":
        _vit_backbone(model)  # a UserError for a model without ViT blocks, before any image is read
    tf = create_transform(meta.get("data_config") or {}, is_training=False)
    if run is not None:
        from fgclf.report_html import run_test_paths

        picks = most_confused(run, args.confused)
        if not picks:
            raise UserError(f"{run} classified every test image correctly: nothing is confused")
        test_paths = run_test_paths(run)
        paths = [test_paths[i] for i, _, _ in picks]
    def decode(path: str):
        try:
            return tf(load_image(path))
        except Exception as err:  # noqa: BLE001 -- PIL raises many types
            raise UserError(f"cannot read image {path} ({type(err).__name__}: {err})") from None

    x = torch.stack([decode(p) for p in paths])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if method is not None:  # the method's own picture of these images
        method.draw(None, model, x, args.output)
        print(f"{method.name}'s own maps of {len(paths)} images -> {args.output}")
        return 0
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).indices
    first = [p for _, _, p in picks] if run is not None else [int(c) for c in top2[:, 0]]
    second = [t for _, t, _ in picks] if run is not None else [int(c) for c in top2[:, -1]]
    if args.cam == "rollout":  # one class-agnostic map per image
        maps = [attention_rollout(model, x, head_fusion=args.head_fusion or "mean")]
    else:
        maps = [class_maps(model, x, first, method=args.cam), class_maps(model, x, second, method=args.cam)]
    shown = displayable(x, meta.get("data_config") or {})
    what = "true" if run is not None else "2nd"
    def short(text: str, n: int = 26) -> str:  # fine-grained names differ at the end: keep it
        return text if len(text) <= n else text[:4] + "..." + text[-(n - 7):]

    if args.cam == "rollout":
        titles = [[short(Path(p).name, 30) + (f"\ntrue: {short(str(names[b]))}" if run is not None else ""),
                   f"rollout; predicted: {short(str(names[a]))}"] for p, a, b in zip(paths, first, second)]
    else:
        titles = [[short(Path(p).name, 30), f"predicted: {short(str(names[a]))}", f"{what}: {short(str(names[b]))}"]
                  for p, a, b in zip(paths, first, second)]
    save_grid(shown, maps, titles, args.output)
    print(f"{args.cam} maps of {len(paths)} images -> {args.output}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
