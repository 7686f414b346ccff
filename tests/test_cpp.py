"""deploy/cpp/qatflow_runner: the exported models run from C++ (libtorch inside the torch wheel)
and give the same logits as Python's torch.jit.load on the same inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.variants import VARIANTS

from conftest import REPO

SOURCE = REPO / "deploy" / "cpp"
RUNNER_TIMEOUT_S = 300  # a shared 2-core machine; a hang should fail, not stall CI


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configures and builds the runner in a temp folder (about 15 s on 2 cores), against this
    interpreter's torch. CI has cmake and a C++ compiler, so their absence fails rather than skips."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found on PATH: the C++ runner test needs cmake and g++")
    build = tmp_path_factory.mktemp("cpp-build")
    steps = [
        ["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        ["cmake", "--build", str(build), "-j2"],
    ]
    start = time.perf_counter()
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(step)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    print(f"qatflow_runner built in {time.perf_counter() - start:.1f} s")
    return build / "qatflow_runner"


def run_runner(runner: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S)


def summary(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


def python_logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    """What a Python deployment gets: the backend from meta.json set before loading (int8 weights
    are prepacked for the engine current at load time), batches of 256 as the runner uses."""
    extra = {"meta.json": ""}
    torch.jit.load(str(model_path), _extra_files=extra)
    backend = json.loads(extra["meta.json"])["backend"]
    previous = torch.backends.quantized.engine
    try:
        if backend:
            torch.backends.quantized.engine = backend
        model = torch.jit.load(str(model_path))
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            return torch.cat([model(xt[i : i + 256]) for i in range(0, len(xt), 256)]).numpy()
    finally:
        torch.backends.quantized.engine = previous


@pytest.fixture(scope="module")
def test_inputs(tiny_workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    workspace, _ = tiny_workspace
    with np.load(workspace.prepared / "test.npz", allow_pickle=False) as test:
        x = np.ascontiguousarray(test["x"], dtype=np.float32)  # already normalized by prepare
    path = tmp_path_factory.mktemp("cpp-inputs") / "inputs.npy"
    np.save(path, x)
    return path, x


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_runner_matches_python(runner, tiny_workspace, test_inputs, tmp_path, variant):
    workspace, _ = tiny_workspace
    inputs, x = test_inputs
    model = {"fp32": VARIANTS["fp32_ts"].path(workspace), "int8": VARIANTS["int8"].path(workspace)}[variant]
    out = tmp_path / "logits.npy"
    result = summary(run_runner(runner, model, inputs, "--out", out, "--repeats", "5"))

    cpp = np.load(out, allow_pickle=False)
    reference = python_logits(model, x)
    classes = len(json.loads((workspace.prepared / "meta.json").read_text())["class_names"])
    assert cpp.dtype == np.float32 and cpp.shape == reference.shape == (len(x), classes)
    if variant == "fp32":
        assert np.allclose(cpp, reference, rtol=1e-4, atol=1e-4), np.abs(cpp - reference).max()
    else:
        assert (cpp.argmax(1) == reference.argmax(1)).all()

    assert result["model"] == str(model)
    assert result["backend"] == ("x86" if variant == "int8" else None)
    assert (result["samples"], result["num_classes"], result["threads"]) == (len(x), classes, 2)
    for key in ("batch_1", "batch_64"):
        latency = result["latency_ms"][key]
        assert 0 < latency["median"] <= latency["p90"], key


def test_runner_repeats_inputs_for_a_batch_larger_than_the_data(runner, tiny_workspace, test_inputs):
    workspace, _ = tiny_workspace
    inputs, x = test_inputs
    big = 2 * len(x) + 1
    result = summary(run_runner(runner, VARIANTS["int8"].path(workspace), inputs, "--batch-sizes", str(big),
                                "--repeats", "2", "--threads", "1"))
    assert list(result["latency_ms"]) == [f"batch_{big}"] and result["threads"] == 1


def test_runner_switches_to_the_backend_meta_names(runner, tiny_workspace, test_inputs, tmp_path):
    # The same int8 model, labelled for qnnpack: its weights must be prepacked and run by qnnpack,
    # as Python does when the engine is set before loading.
    workspace, _ = tiny_workspace
    inputs, x = test_inputs
    extra = {"meta.json": ""}
    model = torch.jit.load(str(VARIANTS["int8"].path(workspace)), _extra_files=extra)
    meta = json.loads(extra["meta.json"]) | {"backend": "qnnpack"}
    relabelled = tmp_path / "int8_qnnpack.pt"
    torch.jit.save(model, str(relabelled), _extra_files={"meta.json": json.dumps(meta)})
    out = tmp_path / "logits.npy"
    result = summary(run_runner(runner, relabelled, inputs, "--out", out, "--repeats", "2", "--batch-sizes", "1"))

    cpp, reference = np.load(out), python_logits(relabelled, x)
    assert result["backend"] == "qnnpack"
    assert np.allclose(cpp, reference, rtol=1e-4, atol=1e-4), np.abs(cpp - reference).max()
    assert not np.array_equal(cpp, python_logits(VARIANTS["int8"].path(workspace), x)), "qnnpack gave x86's exact logits"


def write_bad_inputs(kind: str, path: Path, x: np.ndarray) -> str:
    """Writes a broken INPUTS file of the given kind; returns what the error message must say."""
    if kind == "float64":
        np.save(path, x.astype(np.float64))
        return "dtype is '<f8', expected '<f4'"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(256))
        return "not an NPY file"
    if kind == "truncated":
        np.save(path, x)
        path.write_bytes(path.read_bytes()[:-4])
        return "data is shorter than shape"
    if kind == "wrong channels":  # a valid NPY the model cannot take: its error, named
        np.save(path, np.repeat(x[:4], 3, axis=1))
        return "failed on"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["float64", "random bytes", "truncated", "wrong channels"])
def test_bad_inputs_are_a_clear_error(runner, tiny_workspace, test_inputs, tmp_path, kind):
    workspace, _ = tiny_workspace
    _, x = test_inputs
    bad = tmp_path / "bad inputs.npy"
    expected = write_bad_inputs(kind, bad, x)
    out = tmp_path / "logits.npy"
    done = run_runner(runner, VARIANTS["int8"].path(workspace), bad, "--out", out)
    assert done.returncode != 0
    assert str(bad) in done.stderr and expected in done.stderr, done.stderr
    assert "Exception raised from" not in done.stderr  # no C++ backtrace, just the message
    assert not out.exists() and not os.path.exists(f"{out}.tmp")
