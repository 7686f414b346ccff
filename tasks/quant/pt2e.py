"""PT2E quantization in one place (torchao's flow, the successor of FX QAT in tasks/quantize.py):
capture the model with torch.export, annotate it for XNNPACK (ExecuTorch's int8 CPU delegate),
fine-tune with fake-quant, convert, and save or load the converted program.

The captured model is an fx.GraphModule, not an nn.Module with train()/eval() of its own: dropout
and BatchNorm switch by rewriting the graph (torchao's move_exported_model_to_train/eval). Freezing
BatchNorm statistics, which FX QAT does per module, is here a flag on the graph's batch_norm calls
that every switch to training re-applies.
"""

from __future__ import annotations

import io
import logging
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

# torchao's CUDA-only kernels (mxfp8, cutlass) cannot load from the CPU wheel and say so on every
# import; nothing here uses them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# Skipping them on purpose, torchao still warns that it skips them, on stderr of every stage that
# imports this module (train does, for its preflight): a stage's stderr is for its errors.
logging.getLogger("torchao").addFilter(
    lambda record: not record.getMessage().startswith("Skipping import of cpp extensions due to "
                                                      "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"))
# torchao 0.18 registers an Enum as a pytree constant, which torch 2.13 deprecates, once per import.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())

import torch  # noqa: E402
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from torchao.quantization.pt2e import (  # noqa: E402
    disable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e import qat_utils  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402

from tasks.runtimes.executorch import MAX_BATCH as PTE_MAX_BATCH  # noqa: E402

QUANTIZER = "xnnpack"
# The batch dimension is dynamic up to this. ExecuTorch plans its memory for the largest batch,
# and its XNNPACK lowering takes that bound from the example's batch size, not from the Dim.
MAX_BATCH = PTE_MAX_BATCH
BATCH_NORMS = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default}
F = torch.nn.functional
aten = torch.ops.aten
CONVS = {F.conv1d: {aten.conv1d.default}, F.conv2d: {aten.conv2d.default},
         F.conv_transpose1d: {aten.conv_transpose1d.default},
         F.conv_transpose2d: {aten.conv_transpose2d.input}}


def batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


def capture(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The model as an ATen graph in training mode, batch size dynamic."""
    return torch.export.export(model.train(), (example[:2].clone(),), dynamic_shapes=(batch_dim(),)).module()


def quantizer() -> XNNPACKQuantizer:
    # Symmetric int8, weights per output channel: what XNNPACK's int8 kernels take.
    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))


def prepare(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Conv-BN folded for QAT and fake-quant inserted, with train()/eval() that work on the graph
    and freeze_bn_stats()/freeze_observers() for the QAT schedule. The caller's model is consumed."""
    with _batch_norm_folding_for_present_convolutions():
        prepared = prepare_qat_pt2e(capture(model, example), quantizer())
    prepared.bn_frozen = False

    def train(self, mode: bool = True):
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        if mode and self.bn_frozen:
            _set_batch_norm_training(self, False)
        return self

    prepared.train = types.MethodType(train, prepared)
    prepared.eval = types.MethodType(lambda self: self.train(False), prepared)
    return prepared


def freeze_bn_stats(prepared: torch.fx.GraphModule) -> None:
    """BatchNorm normalizes with, and stops updating, its running statistics (the graph's
    batch_norm calls run in inference mode from now on, also when training)."""
    prepared.bn_frozen = True
    _set_batch_norm_training(prepared, False)


def freeze_observers(prepared: torch.fx.GraphModule) -> None:
    prepared.apply(disable_observer)


def _set_batch_norm_training(graph_module: torch.fx.GraphModule, training: bool) -> None:
    for node in graph_module.graph.nodes:
        if node.target in BATCH_NORMS:
            args = list(node.args)
            args[5] = training  # (input, weight, bias, running_mean, running_var, training, ...)
            node.args = tuple(args)
    graph_module.recompile()


def convert(prepared: torch.fx.GraphModule, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The int8 program: quantize/dequantize around each int8 op, int8 weights folded in, as an
    ExportedProgram with a dynamic batch (what ExecuTorch lowers and the parity check runs)."""
    prepared.eval()
    with _batch_norm_folding_for_present_convolutions():
        converted = convert_pt2e(prepared)
    _drop_batch_counters(converted)
    move_exported_model_to_eval(converted)
    return torch.export.export(converted, (example[:2].clone(),), dynamic_shapes=(batch_dim(),))


def _drop_batch_counters(graph_module: torch.fx.GraphModule) -> None:
    """Remove the `num_batches_tracked += 1` of every folded BatchNorm. torchao 0.18 removes
    BatchNorm2d's only; a 1-D CNN's would stay an in-place update of a counter inference never
    reads, which ExecuTorch keeps as a mutable buffer (and warns about)."""
    for node in list(graph_module.graph.nodes):
        counter = node.args[0] if node.target == torch.ops.aten.add_.Tensor else None
        if (isinstance(counter, torch.fx.Node) and counter.op == "get_attr"
                and counter.target.endswith("num_batches_tracked") and not node.users):
            graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()


@contextmanager
def _batch_norm_folding_for_present_convolutions() -> Iterator[None]:
    """prepare_qat_pt2e and convert_pt2e fuse (then fold) BatchNorm into each kind of convolution
    by matching ~24 pattern graphs per kind, each traced with torch.export: 1-D, 2-D and both
    transposed kinds, ~20 s for convert alone whatever the model's size. Only the kinds the graph
    holds can match anything, so the others are skipped (torchao 0.18's helpers, patched here)."""

    def only_present(helper):
        def call(m, conv_fn, *args, **kwargs):
            if not any(node.target in CONVS[conv_fn] for node in m.graph.nodes):
                return m
            return helper(m, conv_fn, *args, **kwargs)
        return call

    helpers = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    with mock.patch.multiple(qat_utils, **{name: only_present(getattr(qat_utils, name)) for name in helpers}):
        yield


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    # Stack traces hold this checkout's absolute paths, and the provenance of the nodes each pass
    # made ("from_node") holds graph ids, which are memory addresses: with either, the bytes would
    # differ from run to run, and so would the file's DVC hash.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
        node.meta.pop("from_node", None)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    return saved.getvalue()


def load_program(path) -> torch.export.ExportedProgram:
    return torch.export.load(path)
