"""Serve the pipeline on its schedule, without a work pool: `python -m flows.serve` (`make serve`).

Name, schedule, parameters and concurrency come from the deployment in prefect.yaml, the file
`prefect deploy` reads, so served and worker-run pipelines share one definition; the flags below
override them without editing the file. Flow runs start in this process's working directory, the
default project_dir.

    python -m flows.serve [--cron "0 3 * * *" | --interval SECONDS] [--name NAME]
                          [--param project_dir=/path/to/project]
                          [--param 'overrides={train.epochs: 30}']
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner
from prefect.schedules import Cron, Interval, Schedule
from prefect.settings import get_current_settings

from flows.options import parse_key_values

CONFIG = Path(__file__).resolve().parents[1] / "prefect.yaml"
ENTRYPOINT = "flows/pipeline.py:pipeline"
NEEDS_SERVER = (
    "flows.serve needs a running Prefect server: start one with `make server` "
    "(prefect server start --host 127.0.0.1) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
)


def deployment_config(path: Path = CONFIG) -> dict[str, Any]:
    """The pipeline's deployment entry in prefect.yaml."""
    deployments = yaml.safe_load(path.read_text())["deployments"]
    for deployment in deployments:
        if deployment["entrypoint"] == ENTRYPOINT:
            return deployment
    raise SystemExit(f"flows.serve: {path} has no deployment with entrypoint {ENTRYPOINT}")


def server_problem(timeout_s: float = 5.0) -> str | None:
    """Why there is no usable server, or None. Without PREFECT_API_URL Prefect would quietly start
    a temporary server that lives as long as this process and never runs the schedule."""
    url = get_current_settings().api.url
    if not url:
        return "PREFECT_API_URL is not set"
    with get_client(httpx_settings={"timeout": timeout_s}, sync_client=True) as client:
        error = client.api_healthcheck()
    return f"no Prefect server answers at {url} ({error})" if error else None


def schedule_from(args: argparse.Namespace, config: dict[str, Any]) -> Schedule:
    if args.interval:
        return Interval(args.interval)
    (configured,) = config["schedules"]
    return Cron(args.cron or configured["cron"], timezone=configured.get("timezone"))


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def main_parser(config: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron expression, in the timezone prefect.yaml names "
                      "(default: %s)" % config["schedules"][0]["cron"])
    when.add_argument("--interval", type=positive, metavar="SECONDS",
                      help="run every SECONDS instead of on the cron schedule (tests, demos)")
    parser.add_argument("--name", default=config["name"],
                        help="deployment name (default: %(default)s)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="flow parameter, VALUE in YAML (repeatable; over prefect.yaml's)")
    return parser


class DrainingRunner(Runner):
    """A Runner that a SIGTERM stops the way a deploy or a reboot wants: it takes no new runs, lets
    the runs in flight finish and record their real state, then exits. Prefect's own Runner
    cancels them (CANCELLED, although the pipeline may have finished). A second SIGTERM does that:
    it cancels what still runs and exits."""

    draining = False

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        if not self.started or self._loop is None:
            sys.exit(0)
        if self.draining:
            self._logger.info("second SIGTERM: cancelling the runs in flight...")
            self.execute_in_background(self.astop)
            return
        self.draining = True
        self._logger.info("SIGTERM: taking no new runs; waiting for the runs in flight to finish "
                          "(SIGTERM again to cancel them)...")
        self.execute_in_background(self._drain_then_stop)

    def _in_flight(self) -> int:
        # Runs from their submission (Pending) until their process exits.
        return len(self._scheduled_run_poller._submitting_flow_run_ids)

    async def _drain_then_stop(self) -> None:
        self._scheduled_run_poller.stopping = True
        quiet = 0
        while quiet < 2:  # twice in a row: a poll under way when SIGTERM came may still submit
            quiet = quiet + 1 if not self._in_flight() else 0
            await asyncio.sleep(1)
        if self.started:
            await self.astop()


def serve(flow: Any, name: str, limit: int | None, **deployment: Any) -> None:
    """flow.serve(), with the DrainingRunner."""
    runner = DrainingRunner(name=name, pause_on_shutdown=False, limit=limit)
    runner.add_flow(flow, name=name, **deployment)
    print(f"serving {flow.name}/{name}; run it now with: prefect deployment run '{flow.name}/{name}'",
          flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        print(f"flows.serve: {type(exc).__name__}, shutting down", file=sys.stderr)


def main() -> None:
    config = deployment_config()
    args = main_parser(config).parse_args()
    parameters = {**(config.get("parameters") or {}), **parse_key_values(args.param, "flows.serve: --param")}
    if problem := server_problem():
        sys.exit(f"{problem}.\n{NEEDS_SERVER}")

    # Imported only now: the pipeline pulls in DVC and the stages, too slow for a refusal.
    from flows.pipeline import pipeline

    limit = config.get("concurrency_limit")
    # Stopping this process (a reboot, a deploy) must not switch the nightly schedule off
    # (serve() never pauses it), and lets the run in flight finish (DrainingRunner).
    serve(
        pipeline,
        name=args.name,
        schedule=schedule_from(args, config),
        parameters=parameters,
        description=config.get("description"),
        tags=config.get("tags"),
        limit=limit,
        concurrency_limit=limit,
        # Flow runs import `flows.pipeline` by name, as this process did, not by a file path
        # relative to the working directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


if __name__ == "__main__":
    main()
