"""python -m training --config configs/NAME.yaml [--set key=value ...] [--resume]

Data-parallel: torchrun --nproc_per_node=N -m training --config ... (see training/distributed.py)."""
from __future__ import annotations

import sys

from polarprune.common.atomicio import WriteFailed
from polarprune.common.cli import EXIT_OK, cli_parser, fail
from polarprune.training.config import load_config
from polarprune.training.errors import TrainingError
from polarprune.training.loop import train

PROG = "python -m training"


def main(argv: list[str] | None = None) -> int:
    arguments = cli_parser(PROG, __doc__)
    arguments.add_argument("--config", help="YAML config (see configs/)")
    arguments.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override one config key; repeatable")
    arguments.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    args = arguments.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        metrics = train(cfg, resume=args.resume)
    except (TrainingError, WriteFailed) as error:  # WriteFailed: a checkpoint or mask the disk refused
        return fail(PROG, error)
    summary = {k: metrics[k] for k in ("test_accuracy", "flops_ratio", "params_ratio", "train_seconds")}
    print("finished:", " ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
