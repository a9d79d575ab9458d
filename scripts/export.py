#!/usr/bin/env python
"""Export a trained model for use without fgclf: ONNX, TorchScript, a plain timm checkpoint or a hub folder.

    python scripts/export.py --model runs/cub_r50 --format onnx --output exports/cub_r50_onnx
    python scripts/export.py --model runs/cub_r50/checkpoints/best --format torchscript --output exports/ts
    python scripts/export.py --model runs/cub_r50 --format timm --output exports/cub_r50_timm
    python scripts/export.py --model runs/sweep/plain/seed1 --format hub --output exports/hub [--push-to-hub me/cub-r50]
    python scripts/export.py --model runs/cub_vit_lora --format adapter --output exports/cub_vit_lora_adapter

``--model``: a run directory (its ``checkpoints/best``), a checkpoint folder or an fgclf export.
ONNX (dynamic batch axis, ``--opset``) and TorchScript exports are run on a batch of other inputs
and compared with PyTorch (max |logit difference| printed; above ``--atol`` the export is removed
and the command fails: a method with data-dependent steps cannot be traced). ``timm`` writes
``model.safetensors`` + timm's ``config.json`` (class names as ``label_names``) for plain timm
models, loadable with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (the folder timm's
``push_to_hub`` uploads). ``hub`` writes that (or, for a method's model, the fgclf export) with a
``README.md`` model card; ``--push-to-hub REPO`` uploads it (refused with one line when offline or
without a token). ``adapter`` (PEFT runs) writes the adapter in PEFT's format with a reference
to the base weights instead of the merged model (``peft.PeftModel.from_pretrained`` on the timm
base rebuilds it; README.md in the folder has the code); every format above exports a PEFT run
merged. ``predict.py``, ``explain.py`` and ``export.py`` take an adapter folder as ``--model``.
Every export writes
``export.json`` (format, source, class names, input config, the check's result).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import ArgumentParser, script_main  # noqa: E402

FORMATS = ("onnx", "torchscript", "timm", "hub", "adapter")


def parse_args(argv: Optional[list[str]]):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="run directory, checkpoint folder or fgclf export")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.add_argument("--onnx-exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx's exporter (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted logit difference (default: %(default)s)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="with --format hub: upload the folder to this hub model repo (needs a token and the network)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} exists and is not a folder")
    if args.push_to_hub and args.format != "hub":
        raise UserError("--push-to-hub uploads a --format hub folder")
    return args


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from fgclf.predict import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    from fgclf.export import check_hub_access, export_model

    if args.push_to_hub:  # before the export's work: no upload can happen offline or without a token
        check_hub_access()

    record = export_model(checkpoint, args.format, args.output, opset=args.opset, exporter=args.onnx_exporter,
                          atol=args.atol)
    checked = (f"; max |logit difference| to PyTorch {record['max_abs_diff']:.2e} on a batch of other inputs"
               if "max_abs_diff" in record else "")
    print(f"exported {checkpoint.path} as {args.format} to {args.output}{checked}")
    if "load" in record:
        print(f"load it with: {record['load']}")
    if args.push_to_hub:
        from fgclf.export import push_to_hub

        print(f"uploaded to {push_to_hub(args.output, args.push_to_hub, private=args.private)}")
    return 0


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
