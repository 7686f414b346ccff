"""Model families, their int8 conversion, the augmentation and the misclassified-samples figure,
on tensors made here (no stage runs)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from tasks.augment import random_shift
from tasks.contracts import ModelConfig
from tasks.errors import ModelError, ParamsError
from tasks.figures import misclassified_figure
from tasks.model import build_model, load_weights, model_config
from tasks.quant.fx import convert, prepare

from conftest import section

# The ConvNet every reference result was trained with, before there were families: its
# state_dict (names in order, shapes) and parameter count, taken from that code.
REFERENCE_PARAMETERS = 278_890
REFERENCE_STATE = [
    ("features.0.weight", (32, 1, 3, 3)), ("features.1", (32,)),
    ("features.4.weight", (64, 32, 3, 3)), ("features.5", (64,)),
    ("features.7.weight", (64, 64, 3, 3)), ("features.8", (64,)),
    ("features.11.weight", (128, 64, 3, 3)), ("features.12", (128,)),
    ("features.14.weight", (128, 128, 3, 3)), ("features.15", (128,)),
    ("classifier.weight", (10, 128)), ("classifier.bias", (10,)),
]
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_reference_state() -> list[tuple[str, tuple]]:
    state = []
    for name, shape in REFERENCE_STATE:
        if name.endswith(("weight", "bias")):
            state.append((name, shape))
        else:  # a BatchNorm: its five entries, the step counter a scalar
            state += [(f"{name}.{entry}", () if entry == "num_batches_tracked" else shape)
                      for entry in BN_ENTRIES]
    return state


def config(layout: str, shape: list[int], **model) -> ModelConfig:
    return model_config(layout, shape, 4, section("train.model", **model))


def test_default_cnn2d_is_the_reference_convnet():
    defaults = model_config("images", [1, 28, 28], 10, section("train.model"))
    assert defaults.model_dump() == {"net": "tasks.model:cnn2d", "input_shape": [1, 28, 28], "num_classes": 10,
                                     "kwargs": {"widths": [32, 64, 128], "dropout": 0.2, "convs_per_stage": 2}}
    model = build_model(defaults)
    state = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    assert state == expected_reference_state()
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMETERS
    assert [type(m).__name__ for m in model.features].count("MaxPool2d") == 3
    assert model.eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("layout, shape, family, widths", [
    ("vectors", [13], "mlp", [256, 128]),
    ("sequences", [3, 40], "cnn1d", [32, 64, 128]),
    ("images", [3, 16, 16], "cnn2d", [32, 64, 128]),
])
def test_family_follows_the_layout_and_classifies_any_batch(layout, shape, family, widths):
    resolved = config(layout, shape)
    assert (resolved.net, resolved.kwargs["widths"]) == (f"tasks.model:{family}", widths)
    model = build_model(resolved).eval()
    for n in (1, 5):
        assert model(torch.randn(n, *shape)).shape == (n, 4)


@pytest.mark.parametrize("layout, shape, family", [
    ("images", [1, 8, 8], "mlp"), ("sequences", [2, 30], "mlp"), ("vectors", [20], "cnn1d"),
])
def test_compatible_overrides_build(layout, shape, family):
    model = build_model(config(layout, shape, family=family, widths=[8, 16])).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 4)


@pytest.mark.parametrize("layout, shape, family", [
    ("vectors", [13], "cnn2d"), ("sequences", [1, 50], "cnn2d"), ("images", [1, 28, 28], "cnn1d"),
])
def test_incompatible_override_is_refused_naming_the_key_and_the_data(layout, shape, family):
    with pytest.raises(ParamsError) as refused:
        config(layout, shape, family=family)
    message = str(refused.value)
    assert message.startswith(f"train.model.family: {family} ")
    assert f"{layout} with sample shape {shape}" in message


def pools(model: nn.Module) -> int:
    return sum(isinstance(m, nn.MaxPool1d | nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("layout, shape, widths, expected_pools", [
    ("images", [1, 8, 8], [32, 64, 128, 128], 3),   # 8 -> 4 -> 2 -> 1, then no more
    ("sequences", [1, 5], [16, 16, 16], 2),          # 5 -> 2 -> 1
    ("sequences", [2, 1], [16, 16], 0),
    ("vectors", [3], [16, 16, 16], 1),               # cnn1d on (N, 3): 3 -> 1
])
def test_small_inputs_pool_only_while_there_is_room(layout, shape, widths, expected_pools):
    family = "cnn1d" if layout == "vectors" else "auto"
    model = build_model(config(layout, shape, family=family, widths=widths, convs_per_stage=3))
    assert pools(model) == expected_pools
    assert model.eval()(torch.randn(2, *shape)).shape == (2, 4)


def test_convs_per_stage_sets_the_depth():
    model = build_model(config("sequences", [1, 64], widths=[8, 8, 8], convs_per_stage=3))
    assert sum(isinstance(m, nn.Conv1d) for m in model.modules()) == 1 + 3 + 3


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("layout, shape, family, kernel", [
    ("vectors", [13], "auto", "quantized::linear_relu"),
    ("sequences", [2, 32], "auto", "quantized::conv1d_relu"),
    ("vectors", [16], "cnn1d", "quantized::conv1d_relu"),
    ("images", [1, 8, 8], "auto", "quantized::conv2d_relu"),
    ("images", [1, 8, 8], "mlp", "quantized::linear_relu"),
])
def test_every_family_converts_to_int8_kernels(backend, layout, shape, family, kernel):
    torch.manual_seed(0)
    x = torch.randn(32, *shape)
    prepared = prepare(build_model(config(layout, shape, family=family, widths=[16, 32])), "qat",
                       backend, x[:1])
    prepared(x)  # the observers need to have seen data
    int8 = convert(prepared).eval()
    with torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.trace(int8, x[:1]))
    kinds = {node.kind() for node in scripted.graph.nodes()}
    assert {kernel, "quantized::linear"} <= kinds
    assert not kinds & {"aten::linear", "aten::conv1d", "aten::conv2d", "aten::_convolution"}
    torch.testing.assert_close(scripted(x), int8(x))


def test_random_shift_moves_whole_images_within_bounds():
    x = torch.zeros(8, 1, 10, 10)
    x[:, :, 5, 5] = 1.0  # one bright pixel; the border (background) is 0
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(shifted[:, 0] == 1, as_tuple=True)[1:]
    assert shifted.sum() == 8 and shifted.shape == x.shape
    assert rows.sub(5).abs().max() <= 2 and cols.sub(5).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 1
    assert random_shift(x, 0, torch.Generator()) is x


def test_random_shift_of_images_is_the_reference_crop_of_the_padded_batch():
    """The image path must not change: same draws from the generator (all row offsets, then all
    column offsets), same crops, so training on images stays bitwise what it was."""
    x = torch.randn(6, 3, 7, 9)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    dy, dx = (torch.randint(0, 5, (6,), generator=draws) for _ in range(2))
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 7, dx[i] : dx[i] + 9] for i in range(6)])
    assert torch.equal(shifted, expected)


def test_random_shift_moves_sequences_along_time_with_edge_values():
    ramp = torch.arange(20.0).expand(16, 2, 20)  # every channel 0, 1, ..., 19
    shifted = random_shift(ramp, 3, torch.Generator().manual_seed(0))
    assert shifted.shape == ramp.shape
    offsets = set()
    for sample in shifted:
        assert torch.equal(sample[0], sample[1])  # channels move together
        offset = int(sample[0][10]) - 10
        offsets.add(offset)
        # Shifted as a whole, the ends held at the edge values (never wrapped around).
        assert abs(offset) <= 3
        assert torch.equal(sample[0], (torch.arange(20.0) + offset).clamp(0, 19))
    assert len(offsets) > 1


def test_random_shift_leaves_vectors_alone():
    x = torch.randn(4, 13)
    assert random_shift(x, 2, torch.Generator().manual_seed(0)) is x


@pytest.mark.parametrize("layout, samples", [
    ("images", np.random.default_rng(0).random((7, 1, 8, 8))),
    ("images", np.random.default_rng(0).random((3, 3, 8, 8))),
    ("sequences", np.random.default_rng(0).normal(size=(4, 3, 50))),
    ("vectors", np.random.default_rng(0).normal(size=(6, 13))),
])
def test_misclassified_figure_draws_each_layout(layout, samples):
    titles = [f"a→b {i}" for i in range(len(samples))]
    fig = misclassified_figure(samples, titles, "title", layout)
    assert isinstance(fig, Figure)
    drawn = [ax for ax in fig.axes if ax.get_title()]
    assert len(drawn) == len(samples)
    for ax, sample in zip(drawn, samples):
        if layout == "images":
            assert ax.images[0].get_array().shape[:2] == sample.shape[1:]
        elif layout == "sequences":
            assert len(ax.lines) == sample.shape[0]  # one line per channel
        else:
            assert len(ax.patches) == sample.shape[0]  # one bar per feature
    fig.canvas.draw()  # renders without pyplot


@pytest.mark.parametrize("layout, shape", [("images", (0, 1, 8, 8)), ("vectors", (0, 13))])
def test_misclassified_figure_says_when_nothing_is_wrong(layout, shape):
    fig = misclassified_figure(np.zeros(shape), [], "none wrong", layout)
    assert "No misclassified" in fig.texts[0].get_text()


NET_FILE = '''
import torch
from torch import nn


def build(num_classes, input_shape, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width),
                         nn.ReLU(), nn.Linear(width, num_classes))


def no_shape(num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def not_a_module(num_classes):
    return "a string"
'''


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """A nets/ package of the user's own in a project folder, imported from it as stages do."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "__init__.py").write_text("")
    (tmp_path / "nets" / "tiny.py").write_text(NET_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nets" or m.startswith("nets.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_a_users_net_is_built_from_its_reference_with_shape_and_kwargs(user_nets):
    resolved = config("images", [1, 6, 6], family="nets.tiny:build", kwargs={"width": 5})
    assert resolved.model_dump() == {"net": "nets.tiny:build", "input_shape": [1, 6, 6], "num_classes": 4,
                                     "kwargs": {"width": 5}}
    model = build_model(resolved)
    assert model[1].out_features == 5
    assert model(torch.zeros(3, 1, 6, 6)).shape == (3, 4)
    # input_shape is passed only to a callable that takes it.
    assert build_model(config("images", [1, 6, 6], family="nets.tiny:no_shape"))(torch.zeros(2, 1, 6, 6)).shape == (2, 4)


@pytest.mark.parametrize("family, kwargs, message", [
    ("nets.missing:build", {}, "nets.missing:build: cannot import nets.missing: ModuleNotFoundError"),
    ("nets.tiny:nope", {}, "nets.tiny:nope: nets.tiny has no callable named 'nope'"),
    ("nets.tiny:not_a_module", {}, "nets.tiny:not_a_module: returned str, not a torch.nn.Module"),
    ("nets.tiny:build", {"depth": 3}, "nets.tiny:build: cannot be called with num_classes and train.model.kwargs ['depth']"),
])
def test_a_net_that_cannot_be_built_is_one_line_naming_it(user_nets, family, kwargs, message):
    with pytest.raises(ModelError) as caught:
        build_model(config("images", [1, 6, 6], family=family, kwargs=kwargs))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_weights_fine_tune_from_a_state_dict_and_a_mismatch_names_the_first_keys(tmp_path):
    resolved = config("vectors", [13], widths=[8])
    source = build_model(resolved)
    torch.save(source.state_dict(), tmp_path / "good.pt")
    model = build_model(resolved)
    load_weights(model, tmp_path / "good.pt", resolved.net)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))

    other = build_model(config("vectors", [13], widths=[16]))
    torch.save({"state_dict": other.state_dict(), "epoch": 3}, tmp_path / "wide.pt")
    with pytest.raises(ParamsError) as caught:
        load_weights(model, tmp_path / "wide.pt", resolved.net)
    assert str(caught.value) == (
        f"train.model.weights: {tmp_path / 'wide.pt'} does not fit tasks.model:mlp: hidden.0.weight is "
        "[16, 13], the model's [8, 13]; hidden.0.bias is [16], the model's [8]; classifier.weight is "
        "[4, 16], the model's [4, 8]")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch wrote")
    with pytest.raises(ParamsError, match="junk.pt: not a torch state_dict file"):
        load_weights(model, tmp_path / "junk.pt", resolved.net)
