"""Run TorchScript models (or torch.export .pt2 programs) the way a deployment would: in a fresh
interpreter that knows nothing of qatflow, with only torch and numpy, normalizing raw inputs from
each model's own metadata.

    python -I tasks/parity_check.py INPUTS.npz OUTDIR MODEL [MODEL ...]

INPUTS.npz holds `x_raw` (source values); OUTDIR/<model file name>.logits.npz receives each model's
`logits`. export.py runs this with `python -I` (isolated: neither the script's folder nor the
working directory is on sys.path), so it must stay self-contained: no import from this project.
All models share one interpreter: starting one per model costs seconds each, and each model still
sets its own quantized engine before it is loaded.
"""

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch


def run_model(model_path: str, x_raw: torch.Tensor) -> np.ndarray:
    # The quantized engine must be chosen before loading: int8 weights are packed for whichever
    # engine is active when the file is read. So read meta.json straight from the archive first.
    with zipfile.ZipFile(model_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/extra/meta.json"))
        meta = json.loads(archive.read(name))
    if meta.get("backend"):
        torch.backends.quantized.engine = meta["backend"]
    if model_path.endswith(".pt2"):
        model = torch.export.load(model_path).module()
    else:
        model = torch.jit.load(model_path, map_location="cpu")
    norm = meta["normalization"]
    shape = (1, -1) + (1,) * (x_raw.ndim - 2)
    x = (x_raw / norm["scale"] - torch.tensor(norm["mean"]).reshape(shape)) / torch.tensor(
        norm["std"]
    ).reshape(shape)
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()


def main(inputs_path: str, output_dir: str, *model_paths: str) -> None:
    with np.load(inputs_path, allow_pickle=False) as data:
        x_raw = torch.from_numpy(data["x_raw"]).to(torch.float32)
    for model_path in model_paths:
        try:
            logits = run_model(model_path, x_raw)
        except Exception as exc:
            sys.exit(f"{Path(model_path).name}: {type(exc).__name__}: {exc}")
        np.savez(Path(output_dir) / f"{Path(model_path).name}.logits.npz", logits=logits)
    leaked = sorted(name for name in sys.modules if name == "tasks" or name.startswith("tasks."))
    if leaked:
        sys.exit(f"parity check imported project modules: {leaked}")


if __name__ == "__main__":
    main(*sys.argv[1:])
