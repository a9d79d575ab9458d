"""A record of the image files that passed the decode check, so a later run checks only what changed.

``--data.verify_images full`` decodes every image before training, so that a corrupt file stops the
run before its first epoch rather than in its middle. On CUB (11,788 JPEGs) that is several seconds
of every run, every seed and every sweep trial, for files that have not changed. This record keeps,
per file, the size, modification time and status-change time (``ctime``: any rewrite, copy or
``touch`` of the file changes it, and no tool can set it back) it had when it passed, and the depth
of the check (``header`` < ``full``); a file changed in the last 2 s before its check is not recorded
(a same-size rewrite within one timestamp tick would otherwise look unchanged). A file whose three stat values still match and that passed at
least the depth asked for is not decoded again; everything else is checked, and files that fail are
never recorded (they are checked every time).

The record is one SQLite file, ``<fgclf cache>/verified.db`` (``$FGCLF_CACHE`` or
``~/.cache/fgclf``), shared by every dataset and by runs that start at the same time. Delete it to
check everything again.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable, Optional, Sequence

LEVEL = {"header": 1, "full": 2}
SETTLE_S = 2.0  # a file changed this recently before its check is not recorded
_CHUNK = 500  # SQLite's limit on bound parameters is 999 in old builds


def _stamp(path: str) -> Optional[tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class VerifiedFiles:
    """The files that passed a check at a given depth, keyed by absolute path (see the module docstring)."""

    def __init__(self, path: Optional[str | Path] = None, settle_s: Optional[float] = None) -> None:
        """``settle_s``: a file modified this recently when it is checked is not recorded (a rewrite of the
        same size within one timestamp tick, 1-2 s on some file systems, would look unchanged; git's
        rule for such files)."""
        if path is None:
            from fgclf.utils import cache_dir

            path = cache_dir() / "verified.db"
        self.path, self.settle_ns = Path(path), int((SETTLE_S if settle_s is None else settle_s) * 1e9)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "ctime_ns INTEGER, level INTEGER)")
        return db

    def passed(self, paths: Sequence[str], mode: str) -> set[str]:
        """The paths whose file is unchanged since it passed a check at least as deep as ``mode``."""
        level = LEVEL[mode]
        wanted = {os.path.abspath(p): p for p in paths}
        found: set[str] = set()
        try:
            with self._connect() as db:
                keys = list(wanted)
                for i in range(0, len(keys), _CHUNK):
                    chunk = keys[i:i + _CHUNK]
                    rows = db.execute(f"SELECT path, size, mtime_ns, ctime_ns, level FROM files WHERE path IN "
                                      f"({','.join('?' * len(chunk))})", chunk).fetchall()
                    for path, size, mtime, ctime, done in rows:
                        if done >= level and _stamp(path) == (size, mtime, ctime):
                            found.add(wanted[path])
        except sqlite3.Error:  # an unreadable record checks everything, as without one
            return set()
        return found

    def stamps(self, paths: Iterable[str]) -> dict[str, Optional[tuple[int, int, int]]]:
        """Each path's (size, mtime_ns, ctime_ns) now: taken before a check, recorded after it passed
        (a file rewritten during the check then no longer matches); None for a file changed within
        ``settle_s`` (never recorded)."""
        import time

        recent = time.time_ns() - self.settle_ns
        out = {}
        for p in paths:
            stamp = _stamp(p)
            out[p] = stamp if stamp is not None and max(stamp[1], stamp[2]) < recent else None
        return out

    def add(self, stamped: dict[str, Optional[tuple[int, int, int]]], mode: str) -> None:
        """Record the files ``{path: stamp}`` (from :meth:`stamps`) as passed at ``mode`` (a deeper
        earlier pass of the same file is kept)."""
        rows = [(os.path.abspath(p), *stamp, LEVEL[mode]) for p, stamp in stamped.items() if stamp is not None]
        if not rows:
            return
        try:
            with self._connect() as db:
                db.executemany(
                    "INSERT INTO files VALUES (?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
                    "mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, level = CASE WHEN "
                    "files.size = excluded.size AND files.mtime_ns = excluded.mtime_ns AND files.ctime_ns = "
                    "excluded.ctime_ns THEN max(files.level, excluded.level) ELSE excluded.level END", rows)
        except sqlite3.Error:  # a read-only or full cache: the next run checks again
            pass


__all__ = ["LEVEL", "VerifiedFiles"]
