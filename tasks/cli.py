"""The thin command-line wrapper shared by every stage (`python -m tasks.<stage>`), predict, the
params check and the flows."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tasks.deprecations import silence_torch_deprecations
from tasks.errors import QatflowError
from tasks.lifeline import die_with_dvc

Configure = Callable[[argparse.ArgumentParser], None]


def debugging() -> bool:
    """Whether to show tracebacks (--debug, or QATFLOW_DEBUG=1)."""
    return os.environ.get("QATFLOW_DEBUG") == "1"


def run_command(
    name: str, main: Callable[[argparse.Namespace], Any], configure: Configure | None = None,
    prog: str | None = None, description: str | None = None,
) -> None:
    """Parse the flags, run `main`, and turn a QatflowError into one clear line + exit 1.

    A traceback is noise for a bad params file or dataset; `--debug` (or QATFLOW_DEBUG=1) shows it.
    Anything that is not a QatflowError is a bug and keeps its traceback. `description` (a module's
    docstring, kept as written) replaces main's docstring in --help.
    """
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m tasks.{name}", description=description or main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter if description else argparse.HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    if configure:
        configure(parser)
    args = parser.parse_args()
    if args.debug:
        # The processes this one starts (a DDP stage's torchrun and workers) show theirs too.
        os.environ["QATFLOW_DEBUG"] = "1"
    debug = debugging()
    silence_torch_deprecations()
    try:
        main(args)
    except QatflowError as exc:
        if debug:
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)


def run_stage(name: str, stage: Callable[[argparse.Namespace], Any]) -> None:
    """A pipeline stage's entry point: the common flags plus --params. Under DVC, the stage dies
    with DVC (die_with_dvc)."""
    die_with_dvc()
    run_command(name, stage, lambda parser: parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"))
