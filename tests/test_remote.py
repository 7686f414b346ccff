"""A shared DVC remote, for real: one clone runs the pipeline and pushes, fresh clones pull the
models and prepared data (or `dvc repro --pull`) without retraining. The S3 remote is moto's S3
server on 127.0.0.1, started here; the other one a local folder."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import dvcrepo
from conftest import copy_reproduced, dvc, init_tiny_project, run

pytestmark = pytest.mark.e2e

BUCKET = "qatflow-test"
# moto accepts any credentials; these only go in env or .dvc/config.local, never in git.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one empty bucket; stopped by its PID afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def source(tmp_path_factory, reproduced):
    """A copy of the tiny project `dvc repro` has run (outputs, DVC cache and git history), its
    state committed, with a bare git repo as origin. A copy, not
    a run of its own: a whole pipeline run costs a minute of the suite, and what is shared here is
    files, whichever run wrote them."""
    base = tmp_path_factory.mktemp("shared")
    root, origin = base / "source", base / "origin.git"
    env = copy_reproduced(reproduced, root) | {"QATFLOW_RUN_NAME": "remote"}
    assert stages_run(dvc("repro", cwd=root, env=env)) == []  # the copy is up to date as it stands
    run("git", "add", "-A", cwd=root, env=env)
    run("git", "commit", "-q", "--allow-empty", "-m", "reference run", cwd=root, env=env)
    run("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=base, env=env)
    run("git", "remote", "add", "origin", str(origin), cwd=root, env=env)
    run("git", "push", "-q", "origin", "main", cwd=root, env=env)
    return root, origin, env


def cached_files(root: Path) -> dict[str, bytes]:
    """Every file of every DVC-cached output dvc.lock records, by path."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    uncached = {path for stage in dvc_yaml.values() for entry in stage.get("outs", []) + stage.get("metrics", [])
                if isinstance(entry, dict) for path, opts in entry.items() if opts.get("cache") is False}
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in uncached:
                continue
            path = root / out["path"]
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                files[str(file.relative_to(root))] = file.read_bytes()
    return files


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def configure_remote(kind: str, source: Path, base: Path, env: dict, s3_endpoint) -> dict:
    """`dvc remote add -d storage ...` committed as a user would (no secret in git); returns the env
    a clone needs to reach it."""
    (source / ".dvc" / "config.local").unlink(missing_ok=True)  # the last test's credentials
    if kind == "local":
        dvc("remote", "add", "-f", "-d", "storage", str(base / "dvc-storage"), cwd=source, env=env)
        clone_env = env
    else:
        endpoint = s3_endpoint()
        dvc("remote", "add", "-f", "-d", "storage", f"s3://{BUCKET}/qatflow", cwd=source, env=env)
        dvc("remote", "modify", "storage", "endpointurl", endpoint, cwd=source, env=env)
        # The pushing side keeps its credentials in the git-ignored .dvc/config.local ...
        for key, value in (("access_key_id", "testing"), ("secret_access_key", "testing")):
            dvc("remote", "modify", "--local", "storage", key, value, cwd=source, env=env)
        # ... a clone reads them from the environment.
        clone_env = env | CREDENTIALS
    run("git", "commit", "-q", "-am", f"{kind} DVC remote", cwd=source, env=env)
    run("git", "push", "-q", "origin", "main", cwd=source, env=env)
    assert "testing" not in run("git", "show", "HEAD:.dvc/config", cwd=source, env=env)
    return clone_env


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_push_then_fresh_clones_pull_byte_identical_outputs_without_retraining(
        kind, source, tmp_path, request):
    root, origin, env = source
    clone_env = configure_remote(kind, root, tmp_path, env, lambda: request.getfixturevalue("s3_endpoint"))
    dvc("push", cwd=root, env=env)
    expected = cached_files(root)
    assert any(p.startswith("models/") for p in expected) and any(p.startswith("data/prepared/") for p in expected)

    # `dvc pull` in one fresh clone ...
    pulled = tmp_path / "pulled"
    run("git", "clone", "-q", str(origin), str(pulled), cwd=tmp_path, env=env)
    assert not (pulled / "models" / "int8.pt").exists()
    dvc("pull", cwd=pulled, env=clone_env)
    assert cached_files(pulled) == expected
    assert json.loads(dvc("status", "--json", cwd=pulled, env=clone_env)) == {}

    # ... `dvc repro --pull` in another: every stage is up to date once its outputs are fetched.
    repro = tmp_path / "repro"
    run("git", "clone", "-q", str(origin), str(repro), cwd=tmp_path, env=env)
    assert stages_run(dvc("repro", "--pull", cwd=repro, env=clone_env)) == []
    assert cached_files(repro) == expected
    assert json.loads(dvc("status", "--json", cwd=repro, env=clone_env)) == {}


def test_an_experiment_pushed_on_one_machine_is_listed_and_applied_on_another(source, tmp_path, monkeypatch):
    """What `python -m flows.pipeline --push` does after a run: `dvc exp push origin EXP`."""
    root, origin, env = source
    configure_remote("local", root, tmp_path, env, None)
    monkeypatch.chdir(root)  # as the flow runs it: DVC adds untracked files relative to the cwd
    name = dvcrepo.save_experiment(root, "nightly-shared")
    pushed = dvcrepo.push_results(root, "origin", name)
    assert "nightly-shared" in pushed and "'storage'" in pushed
    assert "refs/exps/" in run("git", "ls-remote", str(origin), cwd=tmp_path, env=env)
    assert name in dvc("exp", "list", "origin", cwd=root, env=env)

    other = tmp_path / "other"
    run("git", "clone", "-q", str(origin), str(other), cwd=tmp_path, env=env)
    assert name in dvc("exp", "list", "origin", cwd=other, env=env)
    dvc("exp", "pull", "origin", name, cwd=other, env=env)
    dvc("exp", "apply", name, cwd=other, env=env)
    assert cached_files(other) == cached_files(root)
    assert json.loads(dvc("status", "--json", cwd=other, env=env)) == {}


def test_a_failed_push_names_the_remote_and_keeps_the_results(source, tmp_path, monkeypatch):
    root, _, env = source
    configure_remote("local", root, tmp_path, env, None)
    monkeypatch.chdir(root)
    name = dvcrepo.save_experiment(root, "push-fails")
    before = {p: (root / p).read_bytes() for p in ("dvc.lock", "params.yaml", "models/int8.pt")}
    with pytest.raises(dvcrepo.PushError, match="git remote 'nowhere'.*dvc exp push nowhere push-fails"):
        dvcrepo.push_results(root, "nowhere", name)
    # A DVC remote that cannot be written (a folder under a plain file): the git ref goes, the
    # cache cannot.
    (tmp_path / "a-file").write_text("")
    dvc("remote", "add", "--local", "-f", "-d", "broken", str(tmp_path / "a-file" / "remote"), cwd=root, env=env)
    try:
        with pytest.raises(dvcrepo.PushError, match="DVC remote 'broken'"):
            dvcrepo.push_results(root, "origin", name)
    finally:
        dvc("remote", "remove", "--local", "broken", cwd=root, env=env)
    assert before == {p: (root / p).read_bytes() for p in before}


def test_check_push_refuses_a_project_without_a_default_remote(tmp_path):
    init_tiny_project(tmp_path)
    with pytest.raises(dvcrepo.PushError, match="dvc remote add -d"):
        dvcrepo.check_push(tmp_path)
