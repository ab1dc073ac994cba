"""polarprune: train once with polarized gates, cut for real, export, serve on Triton, measure.

The stages live in the repository's top-level folders (training/, export/, serving/, bench/, common/) and
are imported as `polarprune.training`, `polarprune.export`, ...: an installed wheel holds them under
`polarprune/` (setup.py maps each folder into this package), and in a checkout this package's path also
covers the repository root, so both forms import the same files under the same names. No top-level
`training` or `common` ever lands in site-packages.

The public API is imported lazily, so `import polarprune.serving` stays free of torch:

    import polarprune
    gated = polarprune.polarize(model, example_input, target_flops=0.5)
"""
from __future__ import annotations

import importlib
from pathlib import Path

STAGES = ("training", "export", "serving", "bench", "common")

_here = Path(__file__).resolve().parent
if not (_here / "training").is_dir() and (_here.parent / "pyproject.toml").is_file() \
        and (_here.parent / "training" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # a checkout (or an editable install): the stages are beside this folder

# name -> module that defines it; loaded on first use
_API = {
    "polarize": "polarprune.training.api",
    "prune": "polarprune.training.api",
    "save_pruned": "polarprune.training.api",
    "load_pruned": "polarprune.training.api",
    "save_for_export": "polarprune.training.api",
    "PolarizedNetwork": "polarprune.training.api",
    "pruning_report": "polarprune.training.pruning_report",
    "write_pruning_report": "polarprune.training.pruning_report",
    "PolarpruneError": "polarprune.common.cli",
    "register_layer": "polarprune.training.custom_layers",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'polarprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
