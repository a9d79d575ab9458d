r"""Generate the embedded fine-grained toy dataset (CUB-200-2011 layout), or a tiny copy of a real
dataset's layout (``--layout stanford_cars --root DIR``: the files a reader expects, toy images).

    python scripts/make_toy_dataset.py --root /tmp/toy_cub --num-classes 12 \
        --train-per-class 30 --test-per-class 20 --image-size 96 --seed 0 [--overwrite]

Every flag is optional; ``--root`` defaults to ``<fgclf cache>/datasets/toy_cub``
(``$FGCLF_CACHE`` or ``~/.cache/fgclf``). An existing dataset made with the same parameters is
reused unless ``--overwrite`` is given. Same as ``python -m fgclf.data.toy``.
"""
import sys
from pathlib import Path

try:
    import fgclf  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgclf.data.toy import main

if __name__ == "__main__":
    from fgclf.runtime import exit_process

    exit_process(main())  # without the ~1.5 s module teardown (fgclf.runtime.exit_process)
