"""ONNX Runtime (.onnx), on CPU.

int8 is the FX-converted QAT model in QDQ form: QuantizeLinear/DequantizeLinear around Conv/Gemm
with int8 weights, carrying the scales and zero points QAT learned (no fresh calibration). The
ExportedMeta JSON is the model's metadata_props "qatflow.meta" (plus readable class_names,
input_shape and normalization keys), so a file is self-describing like the TorchScript ones.

Only torch's legacy (TorchScript-based) exporter handles the converted int8 graph: the traced
TorchScript file fails ("Quantized weight value not found"), and so do the reference and the
prepared (fake-quant) models. fp32 goes the same way, which needs no onnxscript and gives the same
bytes for the same weights (DVC hashes them).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from tasks.contracts import ExportedMeta, exported_meta_text, parse_json
from tasks.errors import DataError
from tasks.quant.coverage import onnx_float_ops
from tasks.runtimes.interface import ExportedFile
from tasks.serving import ort_session_config
from tasks.runtimes.torchscript import first_line

NAME = "onnxruntime"
LABEL = "ONNX Runtime"  # for people: in messages
SUFFIX = ".onnx"
STAGE = "export_onnx"
META_KEY = "qatflow.meta"  # metadata_props key of the ExportedMeta JSON
OPSET = 17
REMEDY = "re-run export_onnx (dvc repro)"


def describe() -> dict[str, str]:
    import onnxruntime

    return {"runtime": NAME, "runtime_version": onnxruntime.__version__}


def unsqueeze_before_quantize(module: torch.nn.Module) -> torch.nn.Module:
    """Move an unsqueeze of a freshly quantized input to before its quantize_per_tensor, in place.

    A 1-D CNN reading vectors adds the channel axis after the input is quantized (FX quantizes
    the model's input first), and torch's ONNX symbolics have no quantized Unsqueeze. Quantizing
    per tensor is elementwise, so unsqueeze-then-quantize gives the same int8 values.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = module.graph
    for node in list(graph.nodes):
        unsqueeze = (node.op == "call_method" and node.target == "unsqueeze") or (
            node.op == "call_function" and node.target is torch.unsqueeze)
        quantize = node.args[0] if unsqueeze else None
        if not (isinstance(quantize, torch.fx.Node) and quantize.target is torch.quantize_per_tensor
                and len(quantize.users) == 1):
            continue
        with graph.inserting_before(quantize):
            moved = graph.create_node(node.op, node.target, (quantize.args[0], *node.args[1:]), node.kwargs)
        quantize.replace_input_with(quantize.args[0], moved)
        node.replace_all_uses_with(quantize)
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    return module


def export(module: torch.nn.Module, example: torch.Tensor, meta: ExportedMeta) -> ExportedFile:
    """`module` as an ONNX model with a dynamic batch dimension and `meta` in its metadata_props,
    and for int8 the ops ONNX Runtime runs in float. An FX int8 module may be rewritten in place
    (unsqueeze_before_quantize)."""
    import onnx

    module = unsqueeze_before_quantize(module)
    saved = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice: it is the one that works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(), (example[:1].clone(),), saved, dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    model = onnx.load_from_string(saved.getvalue())
    # Nothing that names this machine or run: the same weights give the same bytes.
    model.doc_string = model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]
    props = {
        META_KEY: exported_meta_text(meta),
        "class_names": json.dumps(meta.class_names),
        "input_shape": json.dumps(meta.input_shape),
        "normalization": meta.normalization.model_dump_json(),
    }
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    payload = model.SerializeToString(deterministic=True)
    return ExportedFile(payload, onnx_float_ops(payload) if meta.backend else None)


def read_meta(path: Path, data: bytes | None = None) -> ExportedMeta:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto()
        model.ParseFromString(data if data is not None else path.read_bytes())
    except (DecodeError, OSError) as exc:
        raise DataError(f"{path}: not an ONNX model qatflow exported (damaged or truncated: "
                        f"{first_line(exc)}); {REMEDY}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise DataError(f"{path}: no {META_KEY} metadata inside; not an ONNX model qatflow "
                        f"exported (or a damaged one); {REMEDY}")
    return parse_json(ExportedMeta, props[META_KEY], f"{path}: {META_KEY}", REMEDY)


class OnnxModel:
    """An ONNX Runtime session called like a torch model: float32 tensor in, logits tensor out."""

    def __init__(self, session) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        try:
            out = self.session.run(None, {self.input_name: batch})[0]
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            # ONNX Runtime's errors subclass Exception only; a failing torch model raises
            # RuntimeError, which is what callers (predict's one-sample check) expect.
            raise RuntimeError(str(exc)) from None
        return torch.from_numpy(out)


def load(path: Path, data: bytes | None = None) -> tuple[OnnxModel, ExportedMeta]:
    """A session on CPU with as many threads as torch uses now (evaluate's thread setting applies
    to it too), and the ExportedMeta the file carries."""
    import onnxruntime as ort

    source = data if data is not None else path.read_bytes()
    meta = read_meta(path, source)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: they are raised, not logged
    # No spinning thread pool where the process serves with a passive OpenMP wait policy (threads.py).
    for key, value in ort_session_config(options.intra_op_num_threads).items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...)
        raise DataError(f"{path}: has qatflow metadata but ONNX Runtime cannot load it "
                        f"({first_line(exc)}); {REMEDY}") from None
    return OnnxModel(session), meta
