"""Prefect's console handler, less the tracebacks of failures users act on.

Prefect logs a failed task or flow run with its traceback (exc_info=True in its task and flow
engines), and has no setting to leave it out. A QatflowError already says what is wrong and where
in one line, so on the console it gets that line alone, as the stages' own errors do
(tasks/cli.py); under --debug (QATFLOW_DEBUG=1) the traceback shows. Anything else is a bug and
keeps its traceback. Prefect's API handler, which the Prefect UI reads, still gets every traceback.

flows/__init__.py names this class for Prefect's `console` handler through the setting Prefect
documents for any key of its logging configuration (PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS), so
that every process that runs flows or tasks, Dask workers included, inherits it.
"""

from __future__ import annotations

import copy
import logging

from prefect.logging.handlers import PrefectConsoleHandler

from tasks.cli import debugging
from tasks.errors import QatflowError


class OneLineConsoleHandler(PrefectConsoleHandler):
    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, QatflowError) and not debugging():
            # A copy: the same record goes on to other handlers, which keep the traceback.
            record = copy.copy(record)
            record.exc_info = record.exc_text = None
        return super().format(record)
