"""Provenance for measured numbers: which command, commit, date and machine produced a file.

Producers stamp their reports with `"provenance": provenance()`; `python -m common.collect` copies the
figures the README shows, with those stamps, into docs/results/*.json through `write_result`.
Standard library and common/ only, so every stage (serving included) may use it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from polarprune.common.atomicio import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
STAMP_KEYS = ("command", "commit", "date", "machine")


class ResultError(Exception):
    """A result cannot be collected: a source file is missing, unreadable or carries no provenance."""


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as a user would type it: `python -m training --config ...`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv and argv[0] not in ("", "-c") else None
    if script is not None and script.is_relative_to(REPO_ROOT):
        parts = list(script.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            parts.pop()
        head = f"python -m {'.'.join(parts)}"
    else:
        head = "python -c" if argv and argv[0] == "-c" else (Path(argv[0]).name if argv and argv[0] else "python")
    return " ".join([head, shlex.join(argv[1:])]).strip()


def git_commit(root: Path = REPO_ROOT) -> dict:
    """HEAD of the checkout the code ran from, and whether tracked files differed from it."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


CODE_COMMIT = git_commit()


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (None off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, avx512f, ...); empty when the system does not list them."""
    return set((_cpuinfo_field("flags") or "").split())


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def provenance() -> dict:
    """Command, commit, date (UTC) and machine of this process. The commit is read when this module was
    first imported, i.e. when the process loaded its code: edits made while it ran are not its code."""
    return {"command": command_line(), **CODE_COMMIT,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def read_source(path: str | os.PathLike) -> tuple[dict, dict]:
    """(document, provenance stamp) of a producer's JSON file; a stampless file is refused."""
    path = Path(path)
    def no_constant(name: str):  # NaN / Infinity: json accepts them, no published number may be one
        raise ValueError(f"holds {name}, not a number")
    try:
        document = json.loads(path.read_text(), parse_constant=no_constant)
    except FileNotFoundError:
        raise ResultError(f"{path}: not found (run the command that writes it first)") from None
    except (OSError, ValueError) as error:
        raise ResultError(f"{path}: unreadable ({error})") from None
    if not isinstance(document, dict):
        raise ResultError(f"{path}: expected a JSON object")
    stamp = document.get("provenance")
    missing = [key for key in STAMP_KEYS if not isinstance(stamp, dict) or not stamp.get(key)]
    if missing:
        raise ResultError(f"{path}: no provenance ({', '.join(missing)} missing): an older version of its "
                          "command wrote it; re-run that command, then collect again")
    return document, stamp


def write_result(path: str | os.PathLike, data: dict, sources: dict[str, dict]) -> dict:
    """Atomically write docs/results/<name>.json: `data` plus the stamp of every file it came from."""
    document = {**data, "sources": {str(source): stamp for source, stamp in sources.items()}}
    write_json(path, document)
    return document
