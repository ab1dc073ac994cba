"""Shared-memory regions the python backend leaves in /dev/shm when its server dies uncleanly.

Each local server gets its own region prefix, so sweeping that prefix after the server and its stubs
are gone removes only what it made.
"""
from __future__ import annotations

from pathlib import Path

SHM_DIR = Path("/dev/shm")


def leftover_shm_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_shm_regions(prefix: str) -> None:
    """Only after every process using them is gone."""
    for region in leftover_shm_regions(prefix):
        region.unlink(missing_ok=True)
