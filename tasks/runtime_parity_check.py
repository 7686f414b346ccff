"""Run model files in the runtimes they are deployed to (ONNX models with ONNX Runtime, ExecuTorch
programs with ExecuTorch's runtime) and the files they are checked against with torch, the way a
deployment would: in a fresh interpreter that knows nothing of qatflow, normalizing raw inputs from
each file's own metadata.

    python -I tasks/runtime_parity_check.py INPUTS.npz OUTDIR MODEL [MODEL ...]

MODEL is an .onnx file (its metadata_props key "qatflow.meta" holds the ExportedMeta JSON), a .pte
(its method qatflow_meta returns it) or a TorchScript .pt (its extra file meta.json). INPUTS.npz holds `x_raw` (source values); OUTDIR/<model file name>.logits.npz receives each model's
`logits`. export_onnx.py and export_executorch.py run this with `python -I`, so it must stay
self-contained: no import from this project.
"""

import os

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

META_KEY = "qatflow.meta"
PTE_META_METHOD = "qatflow_meta"
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA-only kernels, and noise


def normalized(x_raw: np.ndarray, meta: dict) -> np.ndarray:
    norm = meta["normalization"]
    shape = (1, -1) + (1,) * (x_raw.ndim - 2)
    x = x_raw.astype(np.float32) / np.float32(norm["scale"])
    x -= np.asarray(norm["mean"], np.float32).reshape(shape)
    x /= np.asarray(norm["std"], np.float32).reshape(shape)
    return x


def run_onnx(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # parity, not speed: one thread is reproducible and cheap
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])
    x = normalized(x_raw, meta)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def run_pte(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import torch
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(model_path)
    meta = json.loads(program.load_method(PTE_META_METHOD).execute([])[0])
    forward = program.load_method("forward")
    x = torch.from_numpy(normalized(x_raw, meta))
    return torch.cat([forward.execute([x[i : i + 256]])[0] for i in range(0, len(x), 256)]).numpy()


def run_torchscript(model_path: str, x_raw: np.ndarray) -> np.ndarray:
    import torch

    with zipfile.ZipFile(model_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/extra/meta.json"))
        meta = json.loads(archive.read(name))
    if meta.get("backend"):  # before loading: int8 weights are packed for the active engine
        torch.backends.quantized.engine = meta["backend"]
    model = torch.jit.load(model_path, map_location="cpu")
    x = torch.from_numpy(normalized(x_raw, meta))
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()


def main(inputs_path: str, output_dir: str, *model_paths: str) -> None:
    with np.load(inputs_path, allow_pickle=False) as data:
        x_raw = data["x_raw"]
    runs = {".onnx": run_onnx, ".pte": run_pte}
    for model_path in model_paths:
        try:
            logits = runs.get(Path(model_path).suffix, run_torchscript)(model_path, x_raw)
        except Exception as exc:
            sys.exit(f"{Path(model_path).name}: {type(exc).__name__}: {exc}")
        np.savez(Path(output_dir) / f"{Path(model_path).name}.logits.npz", logits=logits)
    leaked = sorted(name for name in sys.modules if name == "tasks" or name.startswith("tasks."))
    if leaked:
        sys.exit(f"parity check imported project modules: {leaked}")


if __name__ == "__main__":
    main(*sys.argv[1:])
