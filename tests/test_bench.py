"""`python -m bench.benchmark --quick` on conftest's tiny workspace: it writes every figure the README
quotes, as numbers, reads the C++ runner's report (a stand-in runner here) and runs without one."""

from __future__ import annotations

import json
import sys

import numpy as np

from bench.benchmark import main as benchmark_main
from tasks.variants import VARIANTS

from conftest import REPO, run

# Speaks qatflow_runner's interface: logits to --out, a JSON report as the last stdout line.
FAKE_RUNNER = """#!{python}
import json, sys
import numpy as np
args = sys.argv[1:]
option = lambda name: args[args.index(name) + 1]
x = np.load(args[1])
np.save(option("--out"), np.zeros((len(x), 10), np.float32))
print("loading", args[0])
print(json.dumps({{"model": args[0], "samples": len(x), "num_classes": 10, "threads": int(option("--threads")),
                  "latency_ms": {{f"batch_{{b}}": {{"median": 0.5, "p90": 0.75}}
                                 for b in option("--batch-sizes").split(",")}}}}))
"""
RATIOS = ["int8_vs_fp32ts_bs1", "int8_vs_fp32ts_bs64", "size_ratio", "accuracy_drop_pp", "onnx_int8_vs_ort_static",
          "onnx_accuracy_vs_ort_static_pp", "onnx_size_ratio", "onnx_accuracy_drop_pp", "pte_size_ratio",
          "pte_accuracy_drop_pp"]
LOAD_RATIOS = ["load_p50_vs_quiet_bs1", "load_p50_vs_quiet_bs64", "load_p99_vs_1thread"]


def test_quick_benchmark_on_tiny_workspace(tiny_workspace, tmp_path, capsys):
    workspace, _ = tiny_workspace
    runner = tmp_path / "qatflow_runner"
    runner.write_text(FAKE_RUNNER.format(python=sys.executable))
    runner.chmod(0o755)
    bench = [sys.executable, "-m", "bench.benchmark", "--quick", "--root", str(workspace.root)]

    run(*bench, "--out", str(tmp_path / "cpp"), "--runner", str(runner), cwd=REPO)
    results = json.loads((tmp_path / "cpp" / "results.json").read_text())
    for key in [*RATIOS, *LOAD_RATIOS]:
        assert isinstance(results[key], int | float), key
        # A ratio is positive; an accuracy drop is negative where int8 scores higher than fp32.
        assert key.endswith("_pp") or results[key] > 0, (key, results[key])
        assert results["targets"][key]["passed"] in (True, False)
    # --quick skips the training overhead; the tiny workspace is no DVC project.
    assert results["train_overhead"] is None and results["noop_repro_s"] is None
    # Every variant once in Python, every TorchScript file once more through the C++ runner.
    assert list(results["variants"]) == list(VARIANTS)
    assert sorted(results["cpp"]) == sorted(f"cpp_{n}" for n, v in VARIANTS.items() if v.runtime == "torchscript")
    for variant in [*results["variants"].values(), *results["cpp"].values()]:
        for threads in ("threads_1", "threads_2"):
            for batch in ("batch_1", "batch_64"):
                assert all(v > 0 for v in variant["latency_ms"][threads][batch].values())
        assert variant["size_bytes"] > 0
    assert results["cpp"]["cpp_int8"]["latency_ms"]["threads_2"]["batch_64"] == {"median_ms": 0.5, "p90_ms": 0.75}
    with np.load(workspace.prepared / "test.npz") as test:  # the stand-in's logits always say class 0
        assert results["cpp"]["cpp_fp32_ts"]["accuracy"] == round(float(np.mean(test["y"] == 0)), 6)
    assert (tmp_path / "cpp" / "results.png").stat().st_size > 0
    # quantize_static's file against ours at every thread count and batch size, and the under-load
    # columns per wait policy, phase, variant and thread count.
    assert set(results["ort_static"]["cells"]) == {f"threads_{n}_batch_{b}" for n in (1, 2) for b in (1, 64)}
    assert results["ort_static"]["padding_changed_predictions"]["ours"] == 0  # exact on our QDQ file
    load = results["under_load"]
    assert set(load["by_policy"]) == {"spin", "passive"} and load["competitors"] >= 1
    for phase in ("quiet", "load"):
        assert load["served"][phase]["int8"]["threads_2"]["batch_1"] == load["by_policy"]["passive"][phase]["int8"]["threads_1"]["batch_1"]

    # The same entry point in this process (its latency worker still a process of its own): the
    # command line ran above, and a second interpreter start would add nothing but its imports.
    benchmark_main([*bench[3:], "--out", str(tmp_path / "no-cpp"), "--runner", str(tmp_path / "missing"),
                    "--threads", "1", "--no-load"])
    assert "C++ runner not built: run `make cpp`" in capsys.readouterr().out
    results = json.loads((tmp_path / "no-cpp" / "results.json").read_text())
    assert results["cpp"] is None and all(isinstance(results[key], int | float) for key in RATIOS)
    assert results["under_load"] is None and all(results[key] is None for key in LOAD_RATIOS)


def test_quick_train_speed_bench_compares_every_mode_and_renders_its_docs_table(tmp_path):
    from bench import train_speed

    out = tmp_path / "train_speed.json"
    printed = run(sys.executable, "-m", "bench.train_speed", "--quick", "--out", str(out), cwd=REPO)
    result = json.loads(out.read_text())
    assert set(result["speed"]) == set(result["training"]) == set(train_speed.MODES)
    assert result["speed"]["fp32"]["vs_fp32"] == 1.0
    assert all(mode["samples_per_s"] > 0 for mode in result["speed"].values())
    # fp32 on the CPU is bitwise repeatable here, and a mode trained from the same seed as fp32
    # in fp32 is fp32.
    assert result["training"]["fp32"]["bitwise_repeatable"] and result["training"]["fp32"]["equals_fp32"]
    assert result["recommended"]["mode"] in train_speed.MODES
    assert f"recommended: {result['recommended']['mode']}" in printed
    table = train_speed.markdown(result).splitlines()
    assert table[0].startswith("| mode | ms per step | samples/s |") and len(table) == 2 + len(train_speed.MODES) + 2
