"""The one place that talks to DVC's Python API (`dvc.repo.Repo` is usable but not a public
promise, so every call to it stays in this small module)."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
from dvc.exceptions import DvcException
from dvc.lock import LockError
from dvc.repo import Repo
from ruamel.yaml import YAML

from flows.options import apply_overrides
from tasks.errors import QatflowError
from tasks.atomic import write_text

# DVC logs through its own handler, as on the command line; propagating too would print every
# line twice under Prefect, which also handles the root logger.
logging.getLogger("dvc").propagate = False

__all__ = ["PushError", "RepoBusy", "StageFailed", "StageNode", "cache_dir", "check_push", "held_lock",
           "pipeline_stages", "push_experiment_ref", "push_results", "reproduce_stage", "save_experiment",
           "set_params", "share_cache"]


class PushError(QatflowError):
    pass


class StageFailed(QatflowError):
    """DVC could not reproduce a stage; the stage's own error line is in its output above."""


class RepoBusy(StageFailed):
    """Another `dvc` command holds the repository's lock: the one failure a later try can fix."""


def _chain(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what it was raised from or while handling, innermost last."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def held_lock(exc: BaseException) -> bool:
    """Whether `exc` comes from DVC's repository lock, wherever in its chain: DVC raises
    ReproductionError from the LockError, which the chain keeps in-process and RepoBusy says across
    a pickle (Prefect's states may hold a copy, which has no chain)."""
    return any(isinstance(e, (LockError, RepoBusy)) for e in _chain(exc))


@dataclass(frozen=True)
class StageNode:
    name: str
    upstream: tuple[str, ...]  # stages whose outputs this one reads


def pipeline_stages(root: Path) -> list[StageNode]:
    """dvc.yaml's stages in an order that runs every stage after its upstream ones.

    The graph is DVC's own (edges point from a stage to the stages producing its deps), so the flow
    never keeps a second, hand-written copy of the pipeline.
    """
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        declared = [stage.name for stage in repo.index.stages]
        upstream = {stage: tuple(s.name for s in graph.successors(stage)) for stage in graph}
        # Among stages free to run, keep dvc.yaml's order: stable, and what users read there.
        order = nx.lexicographical_topological_sort(
            graph.reverse(copy=True), key=lambda stage: f"{declared.index(stage.name):04d}"
        )
        return [StageNode(stage.name, upstream[stage]) for stage in order]


def reproduce_stage(root: Path, name: str) -> bool:
    """`dvc repro --single-item NAME`: runs the stage only if DVC finds it changed; updates dvc.lock.
    Returns whether it ran."""
    with Repo(str(root)) as repo:
        try:
            return bool(repo.reproduce(name, single_item=True))
        except DvcException as exc:
            # DVC's messages on one line, outermost first: "failed to reproduce 'train': failed to
            # run: ...", or for a lock, which one and which process holds it.
            why = " ".join(": ".join(dict.fromkeys(str(e) for e in _chain(exc) if str(e))).split())
            if held_lock(exc):
                raise RepoBusy(f"stage {name!r}: another dvc command holds a lock on the repository "
                               f"({why})") from exc
            raise StageFailed(f"stage {name!r}: {why}") from exc


def set_params(params_file: Path, overrides: dict[str, Any]) -> None:
    """Write dotted-key overrides into params.yaml the way `dvc exp run -S` does: a round trip that
    keeps comments and key order, written atomically."""
    yaml = YAML()
    # ruamel writes None as an empty value; params.yaml spells it `null`.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = yaml.load(params_file.read_text())
    apply_overrides(data, overrides)
    out = io.StringIO()
    yaml.dump(data, out)
    write_text(params_file, out.getvalue())


def save_experiment(root: Path, name: str | None) -> str | None:
    """Record the workspace (params, dvc.lock, metrics, cached outputs) as a DVC experiment, as
    `dvc exp save --name NAME` does. Returns the experiment's name."""
    with Repo(str(root)) as repo:
        # Like `dvc exp run`, keep what the stages wrote for git (metrics, plots, DVC's .gitignore
        # entries) even when it is not tracked yet; cached outputs travel through the DVC cache.
        produced = set()
        for out in repo.index.outs:
            path = Path(out.fs_path).relative_to(root)
            produced.add(str(path.parent / ".gitignore") if out.use_cache else str(path))
        untracked = sorted(p for p in produced if (root / p).exists())
        rev = repo.experiments.save(name=name, force=True, include_untracked=untracked)
        if rev is None:
            return None
        return repo.experiments.get_exact_name([rev]).get(rev) or name


def _dvc_remote(repo: Repo) -> str:
    """The default DVC remote, as `name (url)`, for messages."""
    name = repo.config["core"].get("remote")
    if not name:
        return "no default DVC remote (dvc remote add -d NAME URL)"
    return f"DVC remote {name!r} ({repo.config['remote'].get(name, {}).get('url', '?')})"


def check_push(root: Path) -> None:
    """Refuse a --push run before it trains when there is nowhere to push the outputs to: no
    default remote, or a local one that is no writable directory. DVC would create a missing one,
    which for a path on an unmounted disk means pushing onto the disk beneath; a remote elsewhere
    (s3://, ssh://, ...) is only reached by the push itself."""
    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise PushError(f"--push needs a default DVC remote in {root}: "
                            "dvc remote add -d NAME URL (docs/scaling-out.md)")
        url = repo.config["remote"].get(name, {}).get("url", "")
        if "://" in url and not url.startswith("file://"):
            return
        # DVC keeps a relative local URL relative to the config file that names it (.dvc/).
        folder = Path(root, ".dvc", url.removeprefix("file://"))
        if not folder.is_dir():
            raise PushError(f"--push: DVC remote {name!r} ({url}) is not there: no directory "
                            f"{os.path.normpath(folder)}; create it, or point the remote elsewhere "
                            f"(dvc remote modify {name} url URL)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PushError(f"--push: DVC remote {name!r} ({url}) cannot be written: "
                            f"{os.path.normpath(folder)} is not writable by this user")


def push_results(root: Path, git_remote: str, experiment: str | None) -> str:
    """Share a run: `dvc exp push GIT_REMOTE EXPERIMENT` (the experiment's git ref to the git
    remote, its cached outputs to the default DVC remote); without an experiment, `dvc push` (the
    workspace's cached outputs only). Returns what was pushed where; raises PushError naming both
    remotes. Nothing in the workspace changes either way."""
    with Repo(str(root)) as repo:
        where = _dvc_remote(repo)
        try:
            if experiment is None:
                pushed = repo.push()
                return f"{pushed} file(s) to {where}"
            result = repo.experiments.push(git_remote, [experiment], push_cache=True)
        except Exception as exc:  # DVC and git raise many kinds; the remote is what users act on
            cause = exc.__cause__ or exc
            if experiment is None:
                what, again = where, "dvc push"
            else:
                what = f"experiment {experiment!r} to git remote {git_remote!r} and {where}"
                again = f"dvc exp push {git_remote} {experiment}"
            raise PushError(
                f"push failed: {what}: {type(cause).__name__}: {cause}. The run's results are kept "
                f"in the workspace; push them again with `{again}`"
            ) from exc
        refused = {status: refs for status, refs in result.items()
                   if status not in ("success", "up_to_date", "uploaded", "url") and refs}
        if refused:
            raise PushError(f"push failed: git remote {git_remote!r} refused experiment {experiment!r} "
                            f"({refused}); the run's results are kept in the workspace")
        return f"experiment {experiment!r} to git remote {git_remote!r}, {result['uploaded']} file(s) to {where}"


def cache_dir(root: Path) -> Path:
    """The project's local DVC cache, as `dvc cache dir` prints it (wherever its config puts it)."""
    with Repo(str(root)) as repo:
        return Path(repo.cache.local_cache_dir)


def share_cache(root: Path, cache: Path) -> None:
    """`dvc cache dir --local CACHE`: this repo reads and writes another project's cache, so outputs
    it already holds are checked out, not rebuilt, and what this repo makes lands there too."""
    with Repo(str(root)) as repo, repo.config.edit("local") as config:
        config["cache"]["dir"] = str(cache)


def push_experiment_ref(root: Path, git_remote: str, experiment: str) -> None:
    """`dvc exp push --no-cache GIT_REMOTE EXPERIMENT`: the experiment's git ref only, for a remote
    that shares this repo's DVC cache. Raises PushError unless the remote took it (the CLI only
    warns about a diverged name)."""
    with Repo(str(root)) as repo:
        result = repo.experiments.push(git_remote, [experiment], push_cache=False)
    if experiment not in result.get("success", []) + result.get("up_to_date", []):
        refused = {status: refs for status, refs in result.items() if status != "uploaded" and refs}
        raise PushError(f"git remote {git_remote!r} did not take experiment {experiment!r} "
                        f"({refused or 'not found'})")
