"""The device and precision of training (tasks/training/device.py) on tensors and tiny models made
here: what runs on this CPU, what is refused and why, what repeats bitwise, and whether the fake
quantization of QAT can run under bf16 autocast. The `gpu` tests need CUDA and skip without it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.errors import QatflowError
from tasks.model import build_model, model_config
from tasks.quant.fx import prepare
from tasks.training import device
from tasks.training.device import Hardware, cpu_state, resolve_device

from conftest import section

MODES = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")(test))


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config("images", [1, 12, 12], 4, section("train.model", widths=[8, 16], dropout=0.0)))


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def train(hardware: Hardware, model: nn.Module, steps: int = 3) -> tuple[nn.Module, list[float]]:
    """The train stage's step (AdamW, label smoothing, loss scaling where it applies)."""
    model = hardware.module(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = hardware.scaler()
    losses = []
    with hardware.deterministic():
        for step in range(steps):
            x, y = batch(step)
            with hardware.autocast():
                loss = F.cross_entropy(model(hardware.batch(x)), hardware.batch(y), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    return model, losses


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_autocast_runs_matmuls_and_convs_in_bf16_and_fp32_leaves_them_alone():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    image, kernel = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with Hardware.of("cpu", "fp32").autocast():
        assert F.linear(x, w).dtype == torch.float32 and F.conv2d(image, kernel).dtype == torch.float32
    with Hardware.of("cpu", "bf16").autocast():
        assert F.linear(x, w).dtype == torch.bfloat16 and F.conv2d(image, kernel).dtype == torch.bfloat16
        # The loss stays fp32: autocast runs reductions like it in full precision.
        assert F.cross_entropy(F.linear(x, w), torch.zeros(4, dtype=torch.long)).dtype == torch.float32
    assert F.linear(x, w).dtype == torch.float32


def test_fp16_on_cpu_is_refused_with_the_reason():
    with pytest.raises(QatflowError) as refused:
        Hardware.of("cpu", "fp16")
    assert "fp16 needs device cuda" in one_line(refused) and "bf16" in str(refused.value)


def test_cuda_is_refused_clearly_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for ask in (lambda: resolve_device("cuda"), lambda: Hardware.of("cuda", "fp32")):
        with pytest.raises(QatflowError) as refused:
            ask()
        assert one_line(refused).startswith("device cuda: ")
        assert "use device cpu or auto" in str(refused.value)
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device_or_precision_is_refused():
    with pytest.raises(QatflowError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(QatflowError, match="expected fp32, bf16 or fp16"):
        Hardware.of("cpu", "int8")


def test_channels_last_applies_to_4d_weights_and_batches_only():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 4))
    model.add_module("conv2d", nn.Conv2d(2, 4, 3))
    on = Hardware.of("cpu", "fp32", channels_last=True)
    moved = on.module(model)
    conv2d = moved.conv2d.weight
    assert conv2d.is_contiguous(memory_format=torch.channels_last) and not conv2d.is_contiguous()
    assert all(p.is_contiguous() for name, p in moved.named_parameters() if not name.startswith("conv2d"))
    images = on.batch(torch.randn(2, 3, 4, 5))
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    for other in (torch.randn(2, 3, 4), torch.randn(2, 3), torch.arange(2)):
        assert on.batch(other).is_contiguous()
    off = Hardware.of("cpu", "fp32", channels_last=False)
    assert off.batch(torch.randn(2, 3, 4, 5)).is_contiguous()
    assert off.module(nn.Conv2d(2, 4, 3)).weight.is_contiguous()


@pytest.mark.parametrize("precision,channels_last", MODES)
def test_a_training_step_runs_in_each_cpu_mode(precision, channels_last):
    hardware = Hardware.of("cpu", precision, channels_last)
    before = copy.deepcopy(tiny_cnn().state_dict())
    model, losses = train(hardware, tiny_cnn())
    assert all(torch.isfinite(torch.tensor(losses)))
    # Autocast casts per op: the weights, their gradients and the optimizer state stay fp32.
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(model.state_dict()["features.0.weight"], before["features.0.weight"])
    assert not hardware.scaler().is_enabled()


def test_describe_says_device_precision_layout_and_emulated_bf16(monkeypatch):
    assert Hardware.of("cpu", "fp32").describe() == "cpu, fp32"
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: True)
    assert Hardware.of("cpu", "bf16", channels_last=True).describe() == "cpu, bf16 autocast, channels_last"
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: False)
    assert Hardware.of("cpu", "bf16").describe() == (
        "cpu, bf16 autocast (emulated: this CPU has no bf16 instructions)")


@pytest.mark.parametrize("precision,channels_last", MODES)
def test_identical_cpu_runs_are_bitwise_identical_in_every_mode(precision, channels_last):
    runs = [train(Hardware.of("cpu", precision, channels_last), tiny_cnn())[0] for _ in range(2)]
    first, second = (cpu_state(model) for model in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bf16_and_channels_last_weights_differ_from_fp32s():
    states = {mode: cpu_state(train(Hardware.of("cpu", *mode), tiny_cnn())[0]) for mode in MODES}
    fp32 = states[MODES[0]]
    for mode in MODES[1:]:
        assert not all(torch.equal(fp32[k], states[mode][k]) for k in fp32), mode


def test_deterministic_is_strict_on_cpu_and_restores_the_previous_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    with Hardware.of("cpu", "fp32").deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_channels_last_checkpoint_has_the_bytes_of_a_plain_one_and_loads_anywhere():
    model = tiny_cnn()
    plain = io.BytesIO()
    torch.save(cpu_state(model), plain)
    trained_cl = Hardware.of("cpu", "fp32", channels_last=True).module(copy.deepcopy(model))
    saved = io.BytesIO()
    torch.save(cpu_state(trained_cl), saved)
    assert saved.getvalue() == plain.getvalue()
    saved.seek(0)
    loaded = tiny_cnn()
    loaded.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
    x, _ = batch()
    for hardware in (Hardware.of("cpu", "fp32"), Hardware.of("cpu", "fp32", channels_last=True)):
        out = hardware.module(copy.deepcopy(loaded)).eval()(hardware.batch(x))
        torch.testing.assert_close(out, model.eval()(x))


def test_cpu_state_is_a_snapshot_not_the_live_weights():
    model = tiny_cnn()
    state = cpu_state(model)
    with torch.no_grad():
        model.features[0].weight.add_(1.0)
    assert not torch.equal(state["features.0.weight"], model.features[0].weight)


def fake_quant_dtypes(prepared: nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for module in prepared.modules():
        if "FakeQuantize" in type(module).__name__:
            module.register_forward_pre_hook(lambda _, inputs: seen.add(inputs[0].dtype))
    return seen


def test_fx_qat_fake_quant_refuses_bf16_autocast_so_qat_stays_fp32():
    """qat.precision must be fp32: under bf16 autocast a conv's output reaches the next fake-quant
    in bf16, and the fused observe-and-fake-quantize kernel of the x86 QAT qconfig takes fp32 only
    (torchao's PT2E fake-quant calls the same kernel)."""
    x, _ = batch()
    prepared = prepare(tiny_cnn(), "qat", "x86", x[:1])
    seen = fake_quant_dtypes(prepared)
    bf16 = torch.autocast("cpu", torch.bfloat16)
    with bf16, pytest.raises(RuntimeError, match="expected scalar type Float but found BFloat16"):
        prepared(x)
    assert torch.bfloat16 in seen
    seen.clear()
    assert prepared(x).dtype == torch.float32 and seen == {torch.float32}


@gpu
def test_cuda_resolves_and_describes_the_gpu():
    hardware = Hardware.of("auto", "fp32")
    assert hardware.device.type == "cuda"
    assert torch.cuda.get_device_name(hardware.device) in hardware.describe()
    assert not torch.backends.cudnn.benchmark


@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_runs_on_cuda(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    hardware = Hardware.of("cuda", precision, channels_last=True)
    assert hardware.scaler().is_enabled() == (precision == "fp16")
    model, losses = train(hardware, tiny_cnn())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert next(model.parameters()).device.type == "cuda"


@gpu
def test_a_cuda_checkpoint_loads_on_cpu_with_the_same_outputs():
    model, _ = train(Hardware.of("cuda", "fp32"), tiny_cnn())
    saved = io.BytesIO()
    torch.save(cpu_state(model), saved)
    saved.seek(0)
    on_cpu = tiny_cnn()
    on_cpu.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(on_cpu.eval()(x), model.eval()(x.cuda()).cpu(), rtol=1e-3, atol=1e-4)


@gpu
def test_identical_cuda_runs_agree():
    """Bitwise only where every op has a deterministic kernel: AdaptiveAvgPool2d's backward has
    none on CUDA (Hardware.deterministic warns there), so this asks for closeness, not equality."""
    first, second = (cpu_state(train(Hardware.of("cuda", "fp32"), tiny_cnn())[0]) for _ in range(2))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5)
