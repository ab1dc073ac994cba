"""Atomic artifact writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a resumed run) sees either the old file or the complete new one, never half of it. A write
that fails (a full disk, a file-size limit) raises WriteFailed naming the file; the old one is untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from polarprune.common.cli import EXIT_FAILED, PolarpruneError


class WriteFailed(PolarpruneError, OSError):
    """A file could not be written (disk full, over a size limit, read-only): the run could not complete."""

    exit_code = EXIT_FAILED

    def __init__(self, path: str | os.PathLike, error: OSError):
        reason = error.strerror or str(error)
        super().__init__(f"{path}: cannot write it ({reason}; is the disk full?); any earlier {Path(path).name} "
                         "is untouched")
        self.errno, self.filename = error.errno, str(path)

    def __str__(self) -> str:
        return self.args[0]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are read by servers running as other users
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp_path, path)
        except WriteFailed:
            raise
        except OSError as error:
            raise WriteFailed(path, error) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
