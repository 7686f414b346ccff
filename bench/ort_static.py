"""The fair ONNX Runtime comparison: what an ONNX Runtime user would do instead of QAT.

`models/fp32.onnx` quantized by ONNX Runtime's own `quantize_static` (QDQ, int8 per-channel
weights, MinMax calibration) on the training samples qat's PTQ baseline calibrates on (the same
shuffled slice: qat.seed's generator, qat.ptq_calibration_batches x qat.batch_size samples).
Our `models/int8.onnx` (QAT's scales) must be at least as accurate and as fast as that file.

Session variants measured on both files alike (bench/benchmark.py times them):
- graph optimization level: ORT_ENABLE_EXTENDED against ORT_ENABLE_ALL (level 3 adds the NHWC
  transformer that runs QLinearConv in NHWC layout);
- the first convolution's input channels padded to a multiple of 4 with zero weights (MLAS's
  symmetric int8 convolution wants it; one input channel misses it). In exact arithmetic the
  padded channels add zeros times zero weights; the bench counts the test predictions it changes
  (none of our file's, one of quantize_static's here: the kernel it switches to rounds differently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from tasks.params import load_params
from tasks.workspace import Workspace

LEVELS = ("extended", "all")


def calibration_samples(workspace: Workspace, params_path: Path) -> np.ndarray:
    """The training samples tasks/qat.py calibrates its PTQ model on, in the same order."""
    p = load_params(params_path).qat
    with np.load(workspace.prepared / "train.npz", allow_pickle=False) as train:
        x = train["x"]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(p.seed)).numpy()
    return np.ascontiguousarray(x[order[: p.ptq_calibration_batches * p.batch_size]], dtype=np.float32)


def build(fp32: Path, out: Path, samples: np.ndarray, batch_size: int = 64) -> Path:
    """`fp32` through quantize_static into `out` (QDQ, per-channel QInt8 weights, QUInt8 activations
    as FBGEMM and our int8.onnx use them), calibrated on `samples` `batch_size` at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: samples[i : i + batch_size]} for i in range(0, len(samples), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if name in n.output), None)


def _weight_tensor(graph: onnx.GraphProto, name: str):
    """(setter, array) of the constant behind a Conv weight: an initializer or a Constant node,
    directly or through one DequantizeLinear."""
    inits = {i.name: i for i in graph.initializer}
    node = _producer(graph, name)
    if node is not None and node.op_type == "DequantizeLinear":
        name, node = node.input[0], _producer(graph, node.input[0])
    if name in inits:
        init = inits[name]
        return (lambda a: init.CopyFrom(numpy_helper.from_array(a, init.name))), numpy_helper.to_array(init)
    if node is not None and node.op_type == "Constant":
        attr = next(a for a in node.attribute if a.name == "value")
        return (lambda a: attr.t.CopyFrom(numpy_helper.from_array(a, attr.t.name))), numpy_helper.to_array(attr.t)
    raise ValueError(f"no constant weight behind {name}")


def pad_first_conv(model: onnx.ModelProto, multiple: int = 4) -> onnx.ModelProto:
    """A copy of `model` whose input is zero-padded to `multiple` channels, with zero weights for
    the new channels in the first Conv (the only consumer path of the input). Same outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    source = graph.input[0].name
    conv = next(n for n in graph.node if n.op_type == "Conv")
    set_weight, weight = _weight_tensor(graph, conv.input[1])
    channels = weight.shape[1]
    if channels % multiple == 0 or any(a.name == "group" and a.i != 1 for a in conv.attribute):
        return model
    extra = -channels % multiple
    set_weight(np.concatenate([weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], 1))
    padded = f"{source}_channels_padded"
    for node in graph.node:
        node.input[:] = [padded if i == source else i for i in node.input]
    rank = len(weight.shape)
    pads = numpy_helper.from_array(np.array([0, 0] + [0] * (rank - 2) + [0, extra] + [0] * (rank - 2), np.int64),
                                   f"{padded}_pads")
    graph.initializer.append(pads)
    graph.node.insert(0, helper.make_node("Pad", [source, pads.name], [padded], mode="constant"))
    return model


def session(model: onnx.ModelProto | bytes, threads: int, level: str = "all"):
    """An ONNX Runtime CPU session on `threads` intra-op threads at graph optimization `level`,
    with the serving options of tasks/serving.py."""
    import onnxruntime as ort

    from tasks.serving import ort_session_config

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.log_severity_level = 3
    for key, value in ort_session_config(threads).items():
        options.add_session_config_entry(key, value)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
