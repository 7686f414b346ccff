"""Run exported model files the way a deployment would: in a fresh interpreter that knows nothing
of qatflow, with only the runtime's own library and numpy, normalizing raw inputs from each
file's own metadata. Every export stage's parity check runs its files (and the files it checks
them against) through this script.

    python -I tasks/runtimes/isolated.py INPUTS.npz OUTDIR MODEL [MODEL ...]

INPUTS.npz holds `x_raw` (source values); OUTDIR/<model file name>.logits.npz receives each
model's `logits`. It runs under `python -I` (isolated: neither the script's folder nor the working
directory is on sys.path), so it must stay self-contained: no import from this project, which it
checks before it exits. All models share one interpreter: starting one per model costs seconds.

One runner per file extension; each reads the metadata where its runtime module embeds it:
TorchScript and torch.export archives' extra file meta.json, an .onnx file's metadata_props
"qatflow.meta", a .pte program's constant method qatflow_meta.
"""

import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA-only kernels, and noise
BATCH = 256


def normalized(x_raw: np.ndarray, meta: dict) -> np.ndarray:
    norm = meta["normalization"]
    shape = (1, -1) + (1,) * (x_raw.ndim - 2)
    x = x_raw.astype(np.float32) / np.float32(norm["scale"])
    x -= np.asarray(norm["mean"], np.float32).reshape(shape)
    x /= np.asarray(norm["std"], np.float32).reshape(shape)
    return x


def archive_meta(model_path: str) -> dict:
    with zipfile.ZipFile(model_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/extra/meta.json"))
        return json.loads(archive.read(name))


def batched(run, x) -> np.ndarray:
    return np.concatenate([np.asarray(run(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])


def run_torchscript(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import torch

    meta = archive_meta(model_path)
    if meta.get("backend"):  # before loading: int8 weights are packed for the active engine
        torch.backends.quantized.engine = meta["backend"]
    model = torch.jit.load(model_path, map_location="cpu")
    with torch.inference_mode():
        return batched(model, torch.from_numpy(normalized(x_raw, meta)))


def run_torch_export(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import torch

    meta = archive_meta(model_path)
    model = torch.export.load(model_path).module()
    with torch.inference_mode():
        return batched(model, torch.from_numpy(normalized(x_raw, meta)))


def run_onnx(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # parity, not speed: one thread is reproducible and cheap
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["qatflow.meta"])
    name = session.get_inputs()[0].name
    return batched(lambda x: session.run(None, {name: x})[0], normalized(x_raw, meta))


def run_executorch(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import torch
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(model_path)
    meta = json.loads(program.load_method("qatflow_meta").execute([])[0])
    forward = program.load_method("forward")
    return batched(lambda x: forward.execute([x])[0], torch.from_numpy(normalized(x_raw, meta)))


RUNNERS = {".pt": run_torchscript, ".pt2": run_torch_export, ".onnx": run_onnx, ".pte": run_executorch}


def main(inputs_path: str, output_dir: str, *model_paths: str) -> None:
    with np.load(inputs_path, allow_pickle=False) as data:
        x_raw = data["x_raw"]
    for model_path in model_paths:
        try:
            logits = RUNNERS[Path(model_path).suffix](model_path, x_raw)
        except Exception as exc:
            sys.exit(f"{Path(model_path).name}: {type(exc).__name__}: {exc}")
        np.savez(Path(output_dir) / f"{Path(model_path).name}.logits.npz", logits=logits)
    leaked = sorted(name for name in sys.modules if name == "tasks" or name.startswith("tasks."))
    if leaked:
        sys.exit(f"parity check imported project modules: {leaked}")


if __name__ == "__main__":
    main(*sys.argv[1:])
