"""Where a run's checkpoints are (kept free of torch imports: scripts and sweeps call it early)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def find_last(run_dir: str | Path) -> Optional[Path]:
    """The run's complete ``last`` checkpoint, or ``last.old`` when a kill fell between the two
    renames of :func:`fgclf.utils.replace_dir` (then ``last.old`` is the newest complete one)."""
    ckpt = Path(run_dir) / "checkpoints"
    for name in ("last", "last.old"):
        if (ckpt / name / "trainer_state.json").is_file():
            return ckpt / name
    return None
