"""The deployables are DVC model-registry artifacts (dvc.yaml's `artifacts:`): each is a cached
stage output, and `dvc artifacts get` fetches one from a project's DVC remote without a clone."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from bench import scratch

from conftest import REPO, run

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
ARTIFACTS = DVC_YAML["artifacts"]
DVC = str(Path(sys.executable).with_name("dvc"))  # the venv's CLI, as a user runs it


def cached_outputs() -> set[str]:
    outs = set()
    for stage in DVC_YAML["stages"].values():
        for out in stage.get("outs", []):
            path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if options.get("cache", True):
                outs.add(path)
    return outs


def test_every_artifact_is_a_cached_stage_output():
    # DVC fetches an artifact from the remote, where only cached outputs go.
    assert {"models/int8.pt", "models/int8.onnx", "models/int8.pte"} <= {a["path"] for a in ARTIFACTS.values()}
    for name, artifact in ARTIFACTS.items():
        assert artifact["path"] in cached_outputs(), f"artifact {name}: {artifact['path']} is no cached stage output"
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"], name


@pytest.mark.e2e
def test_dvc_artifacts_get_fetches_each_declared_model_from_the_remote(tmp_path):
    """A git + DVC repo with the project's `artifacts:` block and one stand-in stage that writes
    every artifact path, pushed to a local-folder remote and tagged as GTO versions it: each
    artifact comes back byte for byte, though the repo's own cache and files are gone."""
    repo, remote, env = tmp_path / "repo", tmp_path / "remote", scratch.project_env("qatflow tests")
    repo.mkdir()
    paths = sorted({artifact["path"] for artifact in ARTIFACTS.values()})
    write = "; ".join(f"open({p!r}, 'wb').write(b'stand-in for {p}' + bytes(range(256)))" for p in paths)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"export": {"cmd": f'python -c "import os; os.makedirs(\'models\', exist_ok=True); {write}"',
                              "outs": paths}},
        "artifacts": ARTIFACTS,
    }, sort_keys=False))
    for command in (["git", "init", "-q", "-b", "main"], [DVC, "init", "-q"],
                    [DVC, "config", "core.analytics", "false"], [DVC, "remote", "add", "-d", "store", str(remote)],
                    [DVC, "repro", "-q"], [DVC, "push", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-q", "-m", "models"]):
        run(*command, cwd=repo, env=env)
    for name in ARTIFACTS:  # a registered version (GTO: an annotated tag name@vX.Y.Z)
        run("git", "tag", "-a", f"{name}@v1.0.0", "-m", f"Registering artifact {name} version v1.0.0",
            cwd=repo, env=env)
    made = {path: (repo / path).read_bytes() for path in paths}
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "models")

    for name, artifact in ARTIFACTS.items():
        out = tmp_path / "fetched" / name / Path(artifact["path"]).name
        run(DVC, "artifacts", "get", str(repo), name, "-o", str(out), cwd=tmp_path, env=env)
        assert out.read_bytes() == made[artifact["path"]], name
