"""The thin `python -m tasks.<stage>` wrapper shared by every stage."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tasks.deprecations import silence_torch_deprecations
from tasks.errors import QatflowError


def run_stage(name: str, stage: Callable[[argparse.Namespace], Any], configure=None) -> None:
    """Parse the common flags, run `stage`, and turn a QatflowError into one clear line + exit 1.

    A traceback is noise for a bad params file or dataset; `--debug` (or QATFLOW_DEBUG=1) shows it.
    Anything that is not a QatflowError is a bug and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=stage.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    if configure:
        configure(parser)
    args = parser.parse_args()
    debug = args.debug or os.environ.get("QATFLOW_DEBUG") == "1"
    silence_torch_deprecations()
    try:
        stage(args)
    except QatflowError as exc:
        if debug:
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
