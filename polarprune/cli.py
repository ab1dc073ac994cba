"""`polarprune train|export|serve|bench|compare ...`: one command over the stages' own command lines.

Each subcommand hands the rest of its arguments to the stage's `main` (the same one `python -m training`,
`python -m export`, ... run), so options, help and exit codes are the stage's. A stage is imported only
when its subcommand runs: `polarprune serve` loads no torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module whose main() runs, what it does)
COMMANDS = {
    "train": ("polarprune.training.__main__", "train a run from a YAML config (python -m training)"),
    "export": ("polarprune.export.__main__", "cut, export ONNX/TensorRT and write Triton models (python -m export)"),
    "serve": ("polarprune.serving.__main__", "serve on Triton and probe; also reload|soak|faults (python -m serving)"),
    "bench": ("polarprune.bench.{name}", "run one benchmark: polarprune bench NAME [options]"),
    "compare": ("polarprune.bench.compare", "every method on one budget (python -m bench.compare)"),
}
# `polarprune bench NAME`: the benchmark modules that have a command line
BENCHMARKS = ("speedup", "train_overhead", "serving_overhead", "latency_target", "shapes", "seeds", "check_timing")


def parser() -> argparse.ArgumentParser:
    """The top-level help and usage errors; a known command's own arguments never pass through it."""
    arguments = argparse.ArgumentParser(
        prog="polarprune", description=__doc__.splitlines()[0],
        epilog="benchmarks: " + ", ".join(BENCHMARKS) + ". `polarprune COMMAND --help` lists a command's "
               "options. Exit codes: 0 success, 1 a check failed, 2 bad input or usage.")
    commands = arguments.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        command = commands.add_parser(name, help=summary)
        if name == "bench":
            command.add_argument("benchmark", choices=BENCHMARKS, metavar="NAME")
    return arguments


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command == "bench" and rest and rest[0] in BENCHMARKS:
        module, rest = COMMANDS["bench"][0].format(name=rest[0]), rest[1:]
    elif command in COMMANDS and command != "bench":
        module = COMMANDS[command][0]
    else:
        parser().parse_args(argv)  # help, or a usage error naming what is wrong (exit 2)
        return 2
    return importlib.import_module(module).main(rest) or 0

if __name__ == "__main__":
    sys.exit(main())
