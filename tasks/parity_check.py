"""Run a TorchScript model (or a torch.export .pt2) the way a deployment would: in a fresh interpreter that knows nothing
of qatflow, with only torch and numpy, normalizing raw inputs from the model's own metadata.

    python -I tasks/parity_check.py MODEL INPUTS.npz OUTPUT.npz

INPUTS.npz holds `x_raw` (source values); OUTPUT.npz receives the `logits`. export.py runs this
with `python -I` (isolated: neither the script's folder nor the working directory is on sys.path),
so it must stay self-contained: no import from this project.
"""

import json
import sys
import zipfile

import numpy as np
import torch


def main(model_path: str, inputs_path: str, output_path: str) -> None:
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
    with np.load(inputs_path, allow_pickle=False) as data:
        x = torch.from_numpy(data["x_raw"]).to(torch.float32)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = (x / norm["scale"] - torch.tensor(norm["mean"]).reshape(shape)) / torch.tensor(
        norm["std"]
    ).reshape(shape)
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    leaked = sorted(name for name in sys.modules if name == "tasks" or name.startswith("tasks."))
    if leaked:
        sys.exit(f"parity check imported project modules: {leaked}")
    np.savez(output_path, logits=logits.numpy())


if __name__ == "__main__":
    main(*sys.argv[1:])
