"""How every command-line entry point ends: one base error class, three exit codes, one error line.

Each stage derives its errors from `PolarpruneError` (training.errors.TrainingError, export.ExportError,
serving.errors.ServingStageError, bench.BenchError); an error class's `exit_code` says whether the
input was bad (2) or a check or the run failed (1). Entry points catch the base class, print one line without a
traceback and return the code; `EXIT_CODES` goes into every `--help`.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_FAILED = 1     # a check failed, or the run could not complete
EXIT_BAD_INPUT = 2  # bad input or usage (argparse's own code for usage errors)

EXIT_CODES = """exit codes:
  0  success
  1  a check failed, or the run could not complete
  2  bad input or usage (the message names the file or key)"""


class PolarpruneError(Exception):
    """Base of every stage's errors. The message names the file or key and says what to do."""

    exit_code = EXIT_BAD_INPUT


def cli_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose --help ends with the exit codes."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   epilog=f"{epilog}\n\n{EXIT_CODES}" if epilog else EXIT_CODES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def fail(prog: str, error: PolarpruneError) -> int:
    """Print `error` as one `prog: error: ...` line on stderr; its exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code
