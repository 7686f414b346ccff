"""The quantization-engine interface both QAT stages fine-tune through: prepare a trained fp32
model for fake-quant training, freeze BatchNorm statistics and then observers on the recipe's
schedule, convert to int8, and save what the export stages read. FX (tasks/quant/fx.py, the
TorchScript and ONNX target) and PT2E (tasks/quant/pt2e.py, the ExecuTorch target) implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer

from tasks.contracts import ModelConfig
from tasks.params import QatParams
from tasks.quant import fx, pt2e

Int8Model = Callable[[torch.Tensor], torch.Tensor]


class Engine(Protocol):
    name: str

    def prepare(self, fp32: nn.Module, example: torch.Tensor) -> nn.Module:
        """Fake-quant inserted, in training mode; `fp32` is consumed."""

    def freeze_bn(self, prepared: nn.Module) -> None: ...

    def freeze_observers(self, prepared: nn.Module) -> None: ...

    def convert(self, prepared: nn.Module, example: torch.Tensor) -> Int8Model:
        """The int8 model, runnable on the CPU; `prepared` is left as it was."""

    def save(self, directory: Path, prepared: nn.Module, converted: Int8Model, config: ModelConfig) -> None:
        """The stage's model files, into `directory` (its DVC output)."""


class FxEngine:
    """FX graph mode: real int8 kernels for TorchScript (x86 FBGEMM or qnnpack) and ONNX QDQ."""

    name = "fx"

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def prepare(self, fp32: nn.Module, example: torch.Tensor) -> nn.Module:
        return fx.prepare(fp32, "qat", self.backend, example)

    def freeze_bn(self, prepared: nn.Module) -> None:
        prepared.apply(freeze_bn_stats)

    def freeze_observers(self, prepared: nn.Module) -> None:
        prepared.apply(disable_observer)

    def convert(self, prepared: nn.Module, example: torch.Tensor) -> Int8Model:
        return fx.convert(prepared)

    def save(self, directory: Path, prepared: nn.Module, converted: Int8Model, config: ModelConfig) -> None:
        # A converted int8 module cannot be pickled: the prepared state rebuilds it (fx.load_int8).
        with open(directory / "qat_state.pt", "wb") as f:
            fx.save_prepared(f, prepared, config, "qat", self.backend)


class Pt2eEngine:
    """torchao's PT2E with the XNNPACK quantizer: the int8 program ExecuTorch lowers."""

    name = "pt2e"

    def prepare(self, fp32: nn.Module, example: torch.Tensor) -> nn.Module:
        return pt2e.prepare(fp32, example)

    def freeze_bn(self, prepared: nn.Module) -> None:
        pt2e.freeze_bn_stats(prepared)

    def freeze_observers(self, prepared: nn.Module) -> None:
        pt2e.freeze_observers(prepared)

    def convert(self, prepared: nn.Module, example: torch.Tensor) -> Int8Model:
        self.program = pt2e.convert(prepared, example)
        return self.program.module()

    def save(self, directory: Path, prepared: nn.Module, converted: Int8Model, config: ModelConfig) -> None:
        (directory / "int8.pt2").write_bytes(pt2e.program_bytes(self.program))


def fine_tuning(params: QatParams):
    """The QAT recipe's optimizer and schedule, one for both engines: SGD with momentum at a low
    LR, cosine-annealed to zero over every step of every epoch."""

    def optimize(model: nn.Module, steps_per_epoch: int):
        optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=0.9)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * steps_per_epoch)

    return optimize


def freeze_schedule(engine: Engine, params: QatParams) -> Callable[[nn.Module, int], None]:
    """Standard QAT: BatchNorm statistics freeze at freeze_bn_epoch, observers at
    freeze_observers_epoch (0-based epochs, applied as the epoch starts)."""

    def on_epoch_start(prepared: nn.Module, epoch: int) -> None:
        if epoch == params.freeze_bn_epoch:
            engine.freeze_bn(prepared)
        if epoch == params.freeze_observers_epoch:
            engine.freeze_observers(prepared)

    return on_epoch_start
