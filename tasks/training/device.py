"""Where training runs and in what precision: the device (auto, cpu, cuda), the autocast precision
(fp32, bf16, fp16) and the memory format (channels_last), chosen once per stage and asked by the
stage runner for each thing it moves or runs.

Training and fake-quant fine-tuning run on the device; checkpoints are written from CPU tensors in
the default memory format (`cpu_state`) and read with map_location="cpu", so a file trained on any
device loads on any other, and conversion, export, parity and evaluation stay on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tasks.errors import QatflowError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
# cuBLAS picks its reduction order per call unless its workspace is fixed, and reads this once,
# when the first handle is made: it must be set before any CUDA work.
CUBLAS_WORKSPACE = ":4096:8"


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU "
            "(no driver, or CUDA_VISIBLE_DEVICES hides it)")


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), by oneDNN's own test: without
    them bf16 autocast still runs, emulated, and gains nothing on fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(requested: str) -> torch.device:
    """auto: cuda when there is one, else cpu. cuda without one is an error saying why."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise QatflowError(f"device cuda: {_why_no_cuda()}; use device cpu or auto")
    if requested not in ("cpu", "cuda"):
        raise QatflowError(f"device {requested!r}: expected auto, cpu or cuda")
    return torch.device(requested)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state_dict as a checkpoint should hold it: on CPU, in the default
    memory format. channels_last weights would otherwise be saved with their strides, so the same
    values would give other bytes (and another DVC hash) than a model trained without it. Always a
    copy: on CPU, .to("cpu") and .contiguous() alone return the live weights themselves."""
    return {name: tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for name, tensor in model.state_dict().items()}


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    precision: Precision
    channels_last: bool  # the runner asks for it for 2-D nets only: it is their conv layout

    @classmethod
    def of(cls, device: Device = "auto", precision: Precision = "fp32",
           channels_last: bool = False) -> Hardware:
        """Resolve and check the choice, and set up deterministic CUDA before any CUDA work."""
        if precision not in ("fp32", *AUTOCAST_DTYPE):
            raise QatflowError(f"precision {precision!r}: expected fp32, bf16 or fp16")
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
            # Benchmark mode times several conv algorithms on the first batches and keeps the
            # fastest, which need not be the same one from run to run.
            torch.backends.cudnn.benchmark = False
        if precision == "fp16" and resolved.type != "cuda":
            raise QatflowError("precision fp16 needs device cuda: CPU autocast in fp16 has few fast "
                               "kernels and no loss scaling here; use bf16 or fp32 on CPU")
        if precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise QatflowError(f"precision bf16: this GPU ({torch.cuda.get_device_name(resolved)}) "
                               "has no bf16 support; use fp16 or fp32")
        return cls(resolved, precision, channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around the forward pass and the loss, not the backward pass or the optimizer step."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, AUTOCAST_DTYPE[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. A
        disabled scaler passes scale(), step() and update() straight through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Deterministic algorithms around training (not inference: int8 kernels raise under it).
        On CUDA only a warning for ops that have no deterministic kernel: AdaptiveAvgPool2d's
        backward, which every built-in CNN has, would otherwise raise."""
        previous = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])

    def module(self, model: nn.Module) -> nn.Module:
        """The model on the device; with channels_last, its 4-D weights (2-D convolutions) in that
        format. Module.to(memory_format=) would also try 5-D ones, which channels_last refuses."""
        model = model.to(self.device)
        if self.channels_last:
            for param in model.parameters():
                if param.dim() == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
        return model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs or labels on the device; a 4-D batch (images) in channels_last when it is on."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        parts = [where, "fp32" if self.precision == "fp32" else f"{self.precision} autocast"]
        if self.precision == "fp16":
            parts[-1] += " + loss scaling"
        elif self.precision == "bf16" and self.device.type == "cpu" and not native_cpu_bf16():
            parts[-1] += " (emulated: this CPU has no bf16 instructions)"
        if self.channels_last:
            parts.append("channels_last")
        return ", ".join(parts)
