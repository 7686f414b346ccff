"""Run ONNX models with ONNX Runtime, and the TorchScript files they are checked against with torch,
the way a deployment would: in a fresh interpreter that knows nothing of qatflow, normalizing raw
inputs from each file's own metadata.

    python -I tasks/onnx_parity_check.py INPUTS.npz OUTDIR MODEL [MODEL ...]

MODEL is an .onnx file (its metadata_props key "qatflow.meta" holds the ExportedMeta JSON) or a
TorchScript .pt (its extra file meta.json). INPUTS.npz holds `x_raw` (source values);
OUTDIR/<model file name>.logits.npz receives each model's `logits`. export_onnx.py runs this with
`python -I`, so it must stay self-contained: no import from this project.
"""

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

META_KEY = "qatflow.meta"


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
    for model_path in model_paths:
        run = run_onnx if model_path.endswith(".onnx") else run_torchscript
        try:
            logits = run(model_path, x_raw)
        except Exception as exc:
            sys.exit(f"{Path(model_path).name}: {type(exc).__name__}: {exc}")
        np.savez(Path(output_dir) / f"{Path(model_path).name}.logits.npz", logits=logits)
    leaked = sorted(name for name in sys.modules if name == "tasks" or name.startswith("tasks."))
    if leaked:
        sys.exit(f"parity check imported project modules: {leaked}")


if __name__ == "__main__":
    main(*sys.argv[1:])
