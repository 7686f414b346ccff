"""The typed files between stages: what the stages write reads back as its contract, and a stale or
hand-edited file is refused with its path and the field at fault, by the stage that reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks.contracts import Normalization, read_exported_meta, read_prepared_meta
from tasks.errors import DataError
from tasks.model import load_checkpoint
from tasks.variants import VARIANTS, written_by

from conftest import TINY_PARAMS, write_params


def test_what_the_stages_wrote_reads_back_typed(tiny_workspace):
    workspace, _ = tiny_workspace
    prepared = read_prepared_meta(workspace.prepared)
    assert prepared.layout == "images" and prepared.input_shape == [1, 28, 28]
    assert prepared.layout_reason  # prepare says why it chose the layout
    _, config = load_checkpoint(workspace.train_model)
    for name, variant in written_by("export").items():
        meta = read_exported_meta(variant.path(workspace))
        assert meta.variant == name and meta.model == config
        assert meta.normalization == prepared.normalization and meta.class_names == prepared.class_names
        assert (meta.backend is None) == (variant.precision == "fp32")


def test_normalization_is_what_prepare_applied(tiny_workspace):
    workspace, _ = tiny_workspace
    norm = read_prepared_meta(workspace.prepared).normalization
    with np.load(workspace.prepared / "test.npz") as test:
        assert np.array_equal(norm.apply(test["x_raw"]), test["x"])


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m.pop("class_names"), "class_names: Field required"),
    (lambda m: m.update(layout="table"), "layout: Input should be 'vectors', 'sequences' or 'images'"),
    (lambda m: m["normalization"].update(std=[0.0]), "normalization.std.0: Input should be greater than 0"),
    (lambda m: m.update(family="cnn2d"), "family: unknown field"),
])
def test_a_hand_edited_prepared_meta_stops_the_next_stage_naming_the_field(tiny_workspace, tmp_path, edit, field):
    workspace, _ = tiny_workspace
    shutil.copytree(workspace.prepared, tmp_path / "data" / "prepared")
    write_params(tmp_path / "params.yaml", TINY_PARAMS)
    meta_path = tmp_path / "data" / "prepared" / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    done = subprocess.run([sys.executable, "-m", "tasks.train"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith(f"train: error: {meta_path}: "), done.stderr
    assert field in message[0] and message[0].endswith("re-run prepare (dvc repro)")
    assert not (tmp_path / "models").exists()


def test_a_checkpoint_with_a_stale_config_is_refused(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    saved = torch.load(workspace.train_model, weights_only=True)
    saved["config"] = {"family": "cnn2d", "widths": [8], **saved["config"]}  # as written before nets/
    del saved["config"]["net"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(DataError, match=r"old.pt: config: net: Field required; family: unknown field"):
        load_checkpoint(tmp_path / "old.pt")


def test_exported_meta_must_be_complete(tiny_workspace, tmp_path):
    workspace, _ = tiny_workspace
    extra = {"meta.json": ""}
    model = torch.jit.load(str(VARIANTS["int8"].path(workspace)), _extra_files=extra)
    meta = json.loads(extra["meta.json"])
    del meta["normalization"]
    torch.jit.save(model, str(tmp_path / "edited.pt"), _extra_files={"meta.json": json.dumps(meta)})
    with pytest.raises(DataError, match=r"edited.pt: meta.json: normalization: Field required; re-run export"):
        read_exported_meta(tmp_path / "edited.pt")


def test_normalization_standardizes_per_channel():
    norm = Normalization(scale=2.0, mean=[0.0, 1.0], std=[1.0, 0.5])
    x = np.array([[[2.0, 4.0], [2.0, 6.0]]])  # one sample, two channels of length 2
    assert norm.apply(x).tolist() == [[[1.0, 2.0], [0.0, 4.0]]]
    assert norm.apply(x).dtype == np.float32
