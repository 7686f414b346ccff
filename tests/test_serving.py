"""tasks/serving.py's serving policy, and bench/ort_static.py's padding of the first
convolution (same outputs): quick, no workspace."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench import ort_static
from tasks import serving as threads

from conftest import REPO


def test_a_batch_of_one_serves_on_one_thread_and_larger_ones_on_all():
    assert threads.serving_threads(1, 2) == 1
    assert threads.serving_threads(64, 2) == 2 and threads.serving_threads(64, 0) == 1


def test_onnx_runtime_stops_spinning_only_where_the_process_waits_passively(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.ort_session_config(2) == threads.ORT_NO_SPIN and threads.ort_session_config(1) == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads.ort_session_config(2) == {}


def test_the_wait_policy_takes_effect_only_before_openmp_loads():
    code = ("from tasks import serving as threads; import os; a = threads.use_serving_wait_policy(); import torch;"
            "print(a, threads.use_serving_wait_policy(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "PASSIVE"]


def test_padding_the_first_convolution_keeps_its_outputs():
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    padded = ort_static.pad_first_conv(model)
    assert [n.op_type for n in padded.graph.node] == ["Pad", "Conv"]
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    a, b = (ort_static.session(m, 1).run(None, {"input": x})[0] for m in (model, padded))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in ort_static.pad_first_conv(padded).graph.node] == ["Pad", "Conv"]  # 4 already
