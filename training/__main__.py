"""python -m training --config configs/NAME.yaml [--set key=value ...] [--resume]

Data-parallel: torchrun --nproc_per_node=N -m training --config ... (see training/distributed.py)."""
from __future__ import annotations

import argparse
import sys

from .arch import SpecError
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .distributed import DistributedError
from .loop import RunError, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, resume=args.resume)
    except (ConfigError, DataError, RunError, CheckpointError, SpecError, DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {k: metrics[k] for k in ("test_accuracy", "flops_ratio", "params_ratio", "train_seconds")}
    print("finished:", " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
