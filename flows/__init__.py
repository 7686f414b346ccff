"""Prefect wiring for qatflow: flows that run the DVC stages as tasks. No stage logic lives here."""
