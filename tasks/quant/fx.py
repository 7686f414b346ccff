"""FX graph-mode quantization in one place: prepare for QAT or PTQ, convert to int8, and save or
rebuild a prepared model from its state_dict (a converted int8 module cannot be pickled whole)."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.ao.quantization import (
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from tasks.contracts import ModelConfig
from tasks.model import build_model, stored_config

Kind = Literal["qat", "ptq"]


def prepare(model: nn.Module, kind: Kind, backend: str, example: torch.Tensor) -> torch.fx.GraphModule:
    """Fuse conv/bn/relu and insert observers (PTQ) or fake-quant modules (QAT).

    prepare_qat_fx needs the model in train mode, prepare_fx in eval mode; both copy nothing, so
    the caller's model is consumed.
    """
    torch.backends.quantized.engine = backend
    if kind == "qat":
        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(backend), (example,))
    return prepare_fx(model.eval(), get_default_qconfig_mapping(backend), (example,))


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Real int8 kernels from a prepared model, which is left untouched."""
    return convert_fx(copy.deepcopy(prepared).eval())


def save_prepared(f, prepared: nn.Module, config: ModelConfig, kind: Kind, backend: str) -> None:
    torch.save({"config": config.model_dump(), "kind": kind, "backend": backend,
                "state_dict": prepared.state_dict()}, f)


def load_int8(path) -> tuple[torch.fx.GraphModule, str]:
    """Rebuild the prepared graph the same way it was made, load its observed/fake-quant state,
    and convert. Returns the int8 module and the quantized engine it was prepared for."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = stored_config(saved, path)
    example = torch.zeros(1, *config.input_shape)
    prepared = prepare(build_model(config), saved["kind"], saved["backend"], example)
    prepared.load_state_dict(saved["state_dict"])
    return convert(prepared), saved["backend"]
