"""The example nets in nets/ go through every target as int8, and tasks/quant/coverage.py names the
ops that do not (tiny random inputs: these check structure, not accuracy; `make bench-nets`
checks accuracy, and tests/test_nets_pipeline.py takes both nets through every stage)."""

from __future__ import annotations

import collections
import copy
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from nets import mobilenet, resnet
from tasks.quant import fx, pt2e
from tasks.quant.coverage import executorch_float_ops, fx_float_ops, onnx_float_ops
from tasks.runtimes.onnx import OPSET

SHAPE = [1, 16, 16]
NETS = {"resnet": resnet.build, "mobilenet": mobilenet.build}
# What each net's frozen int8 TorchScript must run as quantized kernels (not aten ops on floats).
INT8_KERNELS = {
    "resnet": {"quantized::conv2d_relu", "quantized::conv2d", "quantized::add_relu", "quantized::linear"},
    "mobilenet": {"quantized::conv2d_relu", "quantized::conv2d", "quantized::hardswish", "quantized::add",
                  "quantized::mul", "quantized::linear"},
}
# Documented in nets/mobilenet.py: ONNX Runtime has no int8 HardSwish or HardSigmoid; it runs
# HardSwish as its ONNX function body, HardSigmoid then Mul.
ONNX_FLOAT = {"resnet": [], "mobilenet": ["HardSigmoid", "Mul"]}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def images(n: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n))


def fx_int8(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """FX QAT for x86 as the qat stage runs it: prepare, a few training steps' worth of forward
    passes (observers and BatchNorm statistics move), convert."""
    prepared = fx.prepare(model, "qat", "x86", x[:1])
    for _ in range(3):
        prepared(x)
    return fx.convert(prepared)


def onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """As tasks/export_onnx.py exports (legacy exporter, its opset, a dynamic batch)."""
    saved = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (x[:1].clone(),), saved, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return saved.getvalue()


class FloatOnPurpose(nn.Module):
    """SiLU and erf have no int8 kernel on any of the three runtimes."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(1, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(self.conv2(self.act(self.conv1(x)))).flatten(1)


@pytest.fixture(scope="module", params=list(NETS))
def net(request) -> tuple[str, nn.Module, torch.fx.GraphModule]:
    """(name, fp32 model, FX int8 model), built once per module: conversion is the slow part."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = NETS[request.param](num_classes=7, input_shape=SHAPE)
    return request.param, model, fx_int8(copy.deepcopy(model), images(8))


@pytest.mark.parametrize("build", NETS.values(), ids=NETS.keys())
@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 20, 24]])
def test_builds_a_classifier_for_any_image_shape(build, shape):
    logits = build(num_classes=5, input_shape=shape).eval()(images(3, shape))
    assert logits.shape == (3, 5) and logits.dtype == torch.float32


@pytest.mark.parametrize("build", NETS.values(), ids=NETS.keys())
@pytest.mark.parametrize("shape", [[784], [28, 28], [1, 1, 28, 28]])
def test_refuses_what_is_not_an_image_and_says_what_it_takes(build, shape):
    with pytest.raises(ValueError, match=r"takes images, input_shape \[channels, height, width\]"):
        build(num_classes=10, input_shape=shape)


def test_fx_qat_runs_every_block_as_an_int8_kernel(net):
    name, _, int8 = net
    assert fx_float_ops(int8) == []
    x = images(5)
    with torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(int8, x[:1]))
        kinds = collections.Counter(node.kind() for node in scripted.graph.nodes())
        assert INT8_KERNELS[name] <= set(kinds)
        # Quantized once on the way in, dequantized once on the way out: nothing in between is float.
        assert kinds["aten::quantize_per_tensor"] == 1 and kinds["aten::dequantize"] == 1
        assert torch.allclose(scripted(x), int8(x))


@pytest.mark.parametrize("net", ["mobilenet"], indirect=True)
def test_mobilenet_depthwise_se_pool_and_concat_stay_int8(net):
    _, _, int8 = net
    modules = dict(int8.named_modules())
    depthwise = [m for m in modules.values() if isinstance(m, torch.ao.nn.quantized.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)
    quantized_inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: quantized_inputs.setdefault(type(m).__name__, []).append(
        i[0].is_quantized and o.is_quantized)) for m in modules.values()
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.Hardsigmoid))]
    int8(images(2))
    for hook in hooks:
        hook.remove()
    assert set(quantized_inputs) == {"AdaptiveAvgPool2d", "Hardsigmoid"}
    assert all(all(flags) for flags in quantized_inputs.values())
    cat = [n for n in int8.graph.nodes if n.target is torch.cat]
    # Joined as int8 on one scale: straight from the convolutions, no dequantize in between.
    assert len(cat) == 1 and all(arg.op == "call_module" for arg in cat[0].args[0])
    producers = [modules[arg.target] for arg in cat[0].args[0]]
    assert len({(float(m.scale), int(m.zero_point)) for m in producers}) == 1


def test_onnx_runtime_runs_the_int8_model_and_names_what_stays_float(net):
    name, _, int8 = net
    data = onnx_bytes(int8, images(1))
    x = images(6)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    assert logits.shape == (6, 7)
    assert np.abs(logits - int8(x).numpy()).max() < 0.1  # one int8 step or so on each logit
    assert sorted(set(onnx_float_ops(data))) == ONNX_FLOAT[name]


def test_coverage_names_the_op_that_falls_back_on_each_runtime():
    x = images(4)
    int8 = fx_int8(FloatOnPurpose(), x)
    assert fx_float_ops(int8) == ["SiLU", "erf"]
    # ONNX has no SiLU: the exporter writes it as Sigmoid and Mul.
    assert onnx_float_ops(onnx_bytes(int8, x)) == ["Erf", "Mul", "Sigmoid"]

    prepared = pt2e.prepare(FloatOnPurpose(), x)
    prepared(x)
    # SiLU decomposes to sigmoid and mul; the convolutions stay int8 in the XNNPACK delegate.
    assert executorch_float_ops(pt2e.convert(prepared, x)) == ["erf", "mul", "sigmoid"]


def test_fx_and_onnx_coverage_find_nothing_in_a_net_that_is_all_int8():
    x = images(4)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    int8 = fx_int8(copy.deepcopy(model), x)
    assert fx_float_ops(int8) == []
    assert onnx_float_ops(onnx_bytes(int8, x)) == []
