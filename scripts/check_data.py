#!/usr/bin/env python
r"""Check a whole dataset without training: parse its manifests exactly as training does, decode
every image (in parallel threads) and print a report.

    python scripts/check_data.py --data.format cub --data.root /data/CUB_200_2011
    python scripts/check_data.py --data.format cub --data.root /data/CUB_200_2011 --data.bbox_crop true \
        --workers 16 --output cub_check.json
    python scripts/check_data.py --data.format imagefolder --data.root /data/flowers --data.val_fraction 0.1
    # unreadable images become warnings (training would skip them with the same flag)
    python scripts/check_data.py --data.format cub --data.root /data/CUB_200_2011 --data.skip_bad_images true
    # the same check from the training script, on the data of a training config (then exits)
    python scripts/train_classifier.py --config configs/toy_effnetlite0_finetune.yaml --check-data

Every image is decoded, whatever --data.verify_images says. Every manifest problem is listed in
one pass (the images of bad lines are left out, the rest is still checked), and a listed file
that is not there counts as an unreadable image (``missing file``). The report: images per split and
class, image size min/median/max, modes converted to RGB, unreadable images with the reason,
files listed twice or with identical content, classes without (train) images, bounding boxes
outside their image; --output also writes it as JSON. Exit status 0 when training can start on
this data (with these --data settings), 2 when it cannot: every reason is printed as an
``error: ...`` line on stderr (fgclf/data/check.py lists what is an error and what a warning).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from fgclf.config import DataConfig, parse_config  # noqa: E402
from fgclf.errors import UserError  # noqa: E402
from fgclf.runtime import script_main  # noqa: E402


@dataclass
class CheckDataConfig:
    """Dataset check settings.

    Args:
        data: The dataset, with the same flags as training (``--data.format``, ``--data.root``,
            ``--data.bbox_crop``, ``--data.val_fraction``, ``--data.skip_bad_images``, ...).
        workers: Threads decoding images (0: CPU count + 4, at most 32).
        output: Also write the report as JSON to this file.
        hash_files: Hash every file to find identical images under different names.
    """

    data: DataConfig = field(default_factory=DataConfig)
    workers: int = 0
    output: Optional[str] = None
    hash_files: bool = True


@script_main
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CheckDataConfig, argv, prog="check_data.py", description=__doc__)
    if cfg.workers < 0:
        raise UserError("--workers must be >= 0 (0: one per CPU core + 4)")
    from fgclf.data.check import run_check  # imports torch via fgclf.data: after --help

    return run_check(cfg.data, workers=cfg.workers or None, output=cfg.output, hash_files=cfg.hash_files)


if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
