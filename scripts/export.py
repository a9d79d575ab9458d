#!/usr/bin/env python
"""Export a trained model for use without fgclf: ONNX, TorchScript or a plain timm checkpoint.

    python scripts/export.py --model runs/cub_r50 --format onnx --output exports/cub_r50_onnx
    python scripts/export.py --model runs/cub_r50/checkpoints/best --format torchscript --output exports/ts
    python scripts/export.py --model runs/cub_r50 --format timm --output exports/cub_r50_timm

``--model``: a run directory (its ``checkpoints/best``), a checkpoint folder or an fgclf export.
ONNX (dynamic batch axis, ``--opset``) and TorchScript exports are run on a batch of other inputs
and compared with PyTorch (max |logit difference| printed; above ``--atol`` the export is removed
and the command fails: a method with data-dependent steps cannot be traced). ``timm`` writes
``model.safetensors`` + timm's ``config.json`` (class names as ``label_names``) for plain timm
models, loadable with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (the folder timm's
``push_to_hub`` uploads). Every export writes
``export.json`` (format, source, class names, input config, the check's result).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import script_main  # noqa: E402

FORMATS = ("onnx", "torchscript", "timm")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one-line errors, exit status 2, like every fgclf script
        raise UserError(message)


def parse_args(argv: Optional[list[str]]):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="run directory, checkpoint folder or fgclf export")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.add_argument("--onnx-exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx's exporter (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted logit difference (default: %(default)s)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"--output {args.output} exists and is not a folder")
    return args


@script_main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from fgclf.predict import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.model)
    from fgclf.export import export_model

    record = export_model(checkpoint, args.format, args.output, opset=args.opset, exporter=args.onnx_exporter,
                          atol=args.atol)
    checked = (f"; max |logit difference| to PyTorch {record['max_abs_diff']:.2e} on a batch of other inputs"
               if "max_abs_diff" in record else "")
    print(f"exported {checkpoint.path} as {args.format} to {args.output}{checked}")
    if "load" in record:
        print(f"load it with: {record['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
