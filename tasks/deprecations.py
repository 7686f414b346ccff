"""torch 2.13 marks torch.ao.quantization and TorchScript deprecated and says so on every call
(DESIGN.md: PT2E moved to torchao; TorchScript is still what deploys here). These exact warnings
are silenced, nothing broader: any other warning still shows."""

import warnings

TORCH_DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized"),
)


def silence_torch_deprecations() -> None:
    for category, message in TORCH_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
