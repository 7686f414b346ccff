"""The example nets of nets/ through the whole pipeline on the built-in data: `make bench-nets`.

Each net runs `dvc repro` (every stage, every runtime, the real deployment gate of
export.max_accuracy_drop) in a throwaway git + DVC project made from this checkout, with
`train.model.family` set to the net. Prints the test accuracy per runtime and writes
bench/nets.json, from which `python -m bench.nets --table` prints the README's table.

    python -m bench.nets [--epochs N] [nets.resnet:build ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scratch import default_params, scratch_project

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("nets.json")
NETS = ["nets.resnet:build", "nets.mobilenet:build"]
# evaluate.json's variants, as the README names their runtimes.
RUNTIMES = {
    "fp32": "fp32 eager", "int8": "int8 QAT, TorchScript", "ptq": "int8 PTQ, TorchScript",
    "int8_onnx": "int8 QAT, ONNX Runtime", "int8_pte": "int8 PT2E QAT, ExecuTorch",
}


def run(net: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="qatflow-bench-nets-") as tmp:
        root = Path(tmp)
        params = default_params(train={"model": {"family": net}, "epochs": epochs})
        env = scratch_project(root, params, "bench")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                              capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            # The stage's own one-line error, not DVC's "failed to reproduce" after it.
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            last = next((line for line in lines if ": error: " in line), lines[-1])
            print(f"{net}: dvc repro failed: {last}", file=sys.stderr)
            return {"net": net, "passed": False, "error": last, "seconds": seconds}
        evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
        trained = json.loads((root / "metrics" / "train.json").read_text())
        export = json.loads((root / "metrics" / "export.json").read_text())
        return {
            "net": net, "passed": True, "seconds": seconds, "epochs": epochs,
            "parameters": trained["parameters"],
            "accuracy": {name: evaluated[name]["accuracy"] for name in RUNTIMES},
            "int8_accuracy_drop_pp": export["gate"]["accuracy_drop"],
            "max_accuracy_drop_pp": export["gate"]["max_accuracy_drop"],
            "int8_size_ratio": evaluated["size_ratio"],
            "environment": trained["environment"],
        }


def table(results: list[dict]) -> str:
    head = "| net | params | " + " | ".join(RUNTIMES.values()) + " | int8 drop (gate) |"
    rows = [head, "|" + "---|" * (len(RUNTIMES) + 3)]
    for r in results:
        if not r["passed"]:
            rows.append(f"| `{r['net']}` | | " + " | ".join("" for _ in RUNTIMES) + f" | failed: {r['error']} |")
            continue
        cells = " | ".join(f"{100 * r['accuracy'][name]:.1f}%" for name in RUNTIMES)
        rows.append(f"| `{r['net']}` | {r['parameters']:,} | {cells} | "
                    f"{r['int8_accuracy_drop_pp']:g} pp (≤ {r['max_accuracy_drop_pp']:g}) |")
    measured = sorted({(r["environment"]["cpu"], r["environment"]["torch"], r["epochs"])
                       for r in results if r["passed"]})
    for cpu, torch_version, epochs in measured:
        rows += ["", f"Measured on {cpu}, torch {torch_version}: {epochs} epochs, the default params otherwise."]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nets", nargs="*", default=NETS)
    parser.add_argument("--epochs", type=int, default=10, help="train.epochs (default: %(default)s)")
    parser.add_argument("--table", action="store_true", help="print the README table of bench/nets.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())["results"]))
        return
    results = [run(net, args.epochs) for net in args.nets]
    if RESULTS.exists():  # a run of some nets keeps the others' last results
        kept = [r for r in json.loads(RESULTS.read_text())["results"] if r["net"] not in args.nets]
        results = sorted(kept + results, key=lambda r: NETS.index(r["net"]) if r["net"] in NETS else len(NETS))
    RESULTS.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(table(results))
    if not all(r["passed"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
