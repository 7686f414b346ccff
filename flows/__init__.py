"""Prefect wiring for qatflow: flows that run the DVC stages as tasks. No stage logic lives here."""

import os

# Before Prefect is imported, which configures its logging then (flows/console.py says why). An
# environment variable, so that the processes the flows start (Dask workers) configure it too.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "flows.console.OneLineConsoleHandler")
