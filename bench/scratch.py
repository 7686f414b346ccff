"""A throwaway git + DVC project made from this checkout, where benches and tests run `dvc repro`:
this checkout's code, dvc.yaml and the given params, with one commit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CODE = ("tasks", "nets")  # what the stages import
FILES = ("dvc.yaml", ".gitignore", ".dvcignore")


def project_env(author: str = "qatflow") -> dict:
    """The environment to run a scratch project's stages, DVC and git with."""
    return {
        **os.environ,
        # dvc.yaml says `python`: make it this interpreter, whatever PATH the caller has.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": f"{author.replace(' ', '-')}@localhost",
        "GIT_COMMITTER_NAME": author, "GIT_COMMITTER_EMAIL": f"{author.replace(' ', '-')}@localhost",
    }


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` on top, mapping into mapping (a nested key changes only itself)."""
    return {**base, **{key: _merged(base[key], value)
                       if isinstance(value, dict) and isinstance(base.get(key), dict) else value
                       for key, value in changes.items()}}


def default_params(**sections: dict) -> dict:
    """The repository's params.yaml, the one place values live (tasks/params.py has no defaults),
    with the given sections' values on top, key by nested key: default_params(train={"model":
    {"widths": [8]}}) changes train.model.widths and keeps every other train.model key."""
    return _merged(yaml.safe_load((REPO / "params.yaml").read_text()), sections)


def _git_dvc(*args: str, cwd: Path, env: dict) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{done.stdout}{done.stderr}")


def scratch_project(root: Path, params: dict, author: str = "qatflow") -> dict:
    """Lays the project out at `root` (an empty or missing folder) and returns the environment to
    run it with. `params` are changes to the repository's params.yaml (default_params): every key
    dvc.yaml lists must be in the project's params.yaml."""
    params = default_params(**params)
    for code in CODE:
        shutil.copytree(REPO / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        shutil.copy(REPO / name, root / name)
    # prepare depends on data/raw (where users put their own data); the builtin source needs none.
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "data" / "raw" / "README.md", root / "data" / "raw" / "README.md")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(author)
    python = sys.executable
    for command in (["git", "init", "-q", "-b", "main"], [python, "-m", "dvc", "init", "-q"],
                    [python, "-m", "dvc", "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "commit", "-q", "-m", "scratch project"]):
        _git_dvc(*command, cwd=root, env=env)
    return env
