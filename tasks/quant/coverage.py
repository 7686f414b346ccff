"""Which ops of an int8 model run in float on each runtime, named by op type, for the export
reports ("where a block falls back to float on some runtime, the report names the op").

    fx_float_ops(converted)        FX-converted model (what models/int8.pt is traced from)
    onnx_float_ops(model)          .onnx path, bytes or ModelProto, as ONNX Runtime runs it
    executorch_float_ops(program)  PT2E program (or its XNNPACK lowering), as ExecuTorch runs it

Each returns the sorted op names, one entry per op in the graph (collections.Counter gives counts);
an empty list means every compute op runs as an int8 kernel. Quantize/dequantize themselves, and
pure shape or layout ops (flatten, reshape, view, transpose, dim-order copies), are not listed: they
move bytes, they do not compute. Each runtime names ops its own way:

- FX: the module class (SiLU, Hardswish) or the function/method name (erf, flatten), of each op
  that runs on a dequantized float tensor.
- ONNX Runtime: the op types of the graph it actually runs (the session's optimized graph, at
  the default level the deployed runtime uses), where the op reads a float tensor; e.g. HardSwish
  shows up as HardSigmoid + Mul, the ONNX function body ORT runs it as, since ORT has no int8
  kernel for either.
- ExecuTorch: ATen op names (hardswish, clamp) of ops left outside the XNNPACK delegate (portable
  float kernels), and of ops inside it that XNNPACK runs in fp32 between its own dequantize and
  quantize: those whose XNNPACK config has no static-int8 variant (hardswish, sigmoid), or that
  are not fenced by dequantize in, quantize out (what PT2E leaves unannotated, e.g. the add, clamp
  and div a Hardsigmoid decomposes to).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch

# FX: quantize ops make int8 tensors from float ones; dequantize goes the other way.
_FX_QUANTIZE = {torch.quantize_per_tensor, torch.quantize_per_channel, torch.quantize_per_tensor_dynamic}
_FX_SHAPE_OPS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "size", "getitem", "getattr", "Flatten", "Identity"}

_ONNX_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_ONNX_INT8 = {"QGemm", "QAttention", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QEmbedLayerNormalization"}
_ONNX_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Shape",
                   "Size", "Constant", "ConstantOfShape", "Cast", "ReorderInput", "ReorderOutput"}
_ONNX_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}

_ET_QUANTIZE = {"quantize_per_tensor", "quantize_per_channel"}
_ET_DEQUANTIZE = {"dequantize_per_tensor", "dequantize_per_channel"}
_ET_SHAPE_OPS = {"view_copy", "_to_dim_order_copy", "_clone_dim_order", "clone", "sym_size",
                 "squeeze_copy", "unsqueeze_copy", "permute_copy", "expand_copy", "getitem"}
# XNNPACK fuses these into the int8 op before them (its output clamp).
_ET_FUSED_ACTIVATIONS = {"relu", "hardtanh", "clamp"}


def counted(ops: list[str]) -> dict[str, int]:
    """How an export report records them: {op: how many}, by name."""
    return dict(sorted(Counter(ops).items()))


def say_float_ops(stage: str, float_ops: dict[str, dict[str, int]], runtime: str) -> None:
    """One line per variant that runs some ops in float on `runtime`, naming them."""
    for variant, ops in float_ops.items():
        if ops:
            named = ", ".join(f"{op} x{count}" for op, count in ops.items())
            print(f"{stage}: {variant} runs these ops in float on {runtime}, not as int8 kernels: {named}")


def fx_float_ops(converted: torch.fx.GraphModule) -> list[str]:
    """Ops of an FX-converted model that compute on float tensors: between a dequantize and a
    quantize, on the model's input before it is quantized, or on its output after dequantize."""
    modules = dict(converted.named_modules())
    is_float: dict[torch.fx.Node, bool] = {}
    found = []
    for node in converted.graph.nodes:
        inputs = [is_float[n] for n in node.all_input_nodes if n in is_float]
        if node.op == "placeholder":
            is_float[node] = True
        elif node.target in _FX_QUANTIZE:
            is_float[node] = False
        elif node.target in ("dequantize", torch.dequantize):
            is_float[node] = True
        elif node.op in ("call_module", "call_function", "call_method"):
            is_float[node] = any(inputs)
            name = (type(modules[node.target]).__name__ if node.op == "call_module"
                    else node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target)))
            if is_float[node] and name not in _FX_SHAPE_OPS:
                found.append(name)
    return sorted(found)


def onnx_float_ops(model: str | os.PathLike | bytes | onnx.ModelProto) -> list[str]:
    """Op types that ONNX Runtime (CPU) runs on float tensors in an int8 QDQ model.

    ORT turns DequantizeLinear -> op -> QuantizeLinear groups into QLinear* kernels only for ops
    it has int8 kernels for; the rest stay float between a DQ and a Q. What it runs is its
    optimized graph, which the session writes out (SessionOptions.optimized_model_filepath).
    """
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = Path(model).read_bytes()
    with tempfile.TemporaryDirectory(prefix="qatflow-coverage-") as tmp:
        options = ort.SessionOptions()  # the default (all) optimization level: what deployment runs
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3  # not the "hardware-specific optimized model" warning
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph

    elem = {t.name: t.type.tensor_type.elem_type for t in [*graph.input, *graph.value_info]}
    elem.update({t.name: t.data_type for t in graph.initializer})
    found = []
    for node in graph.node:  # saved in topological order
        source = elem.get(node.input[0]) if node.input else None
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            out = onnx.TensorProto.UINT8
        elif node.op_type == "DequantizeLinear":
            out = onnx.TensorProto.FLOAT
        elif node.op_type.startswith("QLinear") or node.op_type in _ONNX_INT8:
            out = onnx.TensorProto.UINT8
        else:
            # Ops without their own int8 kernel that ORT still runs on int8 data (MaxPool,
            # Reshape) keep their input's type. An unknown type counts as float.
            out = source
            if (source is None or source in _ONNX_FLOATS) and node.op_type not in _ONNX_SHAPE_OPS | _ONNX_QDQ:
                found.append(node.op_type)
        for name in node.output:
            elem.setdefault(name, out)
    return sorted(found)


def executorch_float_ops(program) -> list[str]:
    """ATen ops of a PT2E int8 program that ExecuTorch runs in float once lowered to XNNPACK.

    `program` is the converted torch.export.ExportedProgram (lowered here as
    tasks/export_executorch.py lowers it), or an EdgeProgramManager already lowered.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if isinstance(program, torch.export.ExportedProgram):
        program = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    int8_capable = {config.target_name.split(".")[0] for config in ALL_PARTITIONER_CONFIGS
                    if ConfigPrecisionType.STATIC_QUANT in config().supported_precision_types()}
    top = program.exported_program().graph_module
    found = []
    for node in top.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.executorch_call_delegate:
            delegate = getattr(top, node.args[0].target)
            found += _float_inside_delegate(delegate.original_module.graph_module, int8_capable)
        elif _op_name(node) not in _ET_SHAPE_OPS | _ET_QUANTIZE | _ET_DEQUANTIZE:
            found.append(_op_name(node))  # left to ExecuTorch's portable (float) kernels
    return sorted(found)


def _float_inside_delegate(graph_module: torch.fx.GraphModule, int8_capable: set[str]) -> list[str]:
    """XNNPACK runs an op as int8 when it has an int8 kernel for it and the op reads only
    dequantized tensors and feeds (possibly through a fused ReLU/clamp) only a quantize."""

    def name(node: torch.fx.Node) -> str:
        return _op_name(node) if node.op == "call_function" else ""

    def computed_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [n for n in node.all_input_nodes if n.op == "call_function"]

    def quantized_out(node: torch.fx.Node) -> bool:
        users = list(node.users)
        if len(users) == 1 and name(users[0]) in _ET_FUSED_ACTIVATIONS:
            users = list(users[0].users)
        return bool(users) and all(name(u) in _ET_QUANTIZE for u in users)

    def int8(node: torch.fx.Node) -> bool:
        return (name(node) in int8_capable and quantized_out(node)
                and all(name(n) in _ET_DEQUANTIZE for n in computed_inputs(node)))

    found = []
    for node in graph_module.graph.nodes:
        op = name(node)
        if not op or op in _ET_SHAPE_OPS | _ET_QUANTIZE | _ET_DEQUANTIZE or int8(node):
            continue
        fused = (op in _ET_FUSED_ACTIVATIONS and len(computed_inputs(node)) == 1
                 and int8(computed_inputs(node)[0]))
        if not fused:
            found.append(op)
    return found


def _op_name(node: torch.fx.Node) -> str:
    """aten.hardswish.default, an edge op of it, or quantized_decomposed.x.default -> its bare name."""
    target = node.target
    schema = getattr(target, "_schema", None) or getattr(getattr(target, "_op", None), "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))
