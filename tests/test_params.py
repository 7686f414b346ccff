import pytest
import yaml

from tasks.errors import ParamsError
from tasks.params import Params, Section, load_params, parse_params

from conftest import REPO, params_of, schema_keys, write_params


def test_repo_params_file_holds_a_value_for_every_schema_key():
    # params.yaml is the one place values live: the schema has no defaults to fall back on.
    load_params(REPO / "params.yaml")
    assert not [name for name, field in Params.model_fields.items() if not field.is_required()]
    for key in schema_keys():
        *sections, last = key.split(".")
        model: type[Section] = Params
        for name in sections:
            model = model.model_fields[name].annotation
        assert model.model_fields[last].is_required(), f"{key} has a default in tasks/params.py"


@pytest.mark.parametrize(
    ("raw", "key", "why"),
    [
        ({"train": {"lr": -0.1}}, "train.lr", "greater than 0"),
        ({"train": {"epochs": "3"}}, "train.epochs", "valid integer"),
        ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"prepare": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "prepare.split", "sum to 1"),
        ({"qat": {"backend": "fbgemm2"}}, "qat.backend", "'x86' or 'qnnpack'"),
        ({"train": {"model": {"widths": []}}}, "train.model.widths", "at least 1"),
        ({"evaluate": {"threads": 0}}, "evaluate.threads", "greater than or equal to 1"),
        ({"qat": {"freeze_observers_epoch": 0}}, "qat.freeze_observers_epoch", "greater than 0"),
        ({"train": {"batch_size": 33, "distributed": {"nproc": 2}}}, "train", "multiple of distributed.nproc 2"),
        ({"qat": {"distributed": {"nproc": 0}}}, "qat.distributed.nproc", "greater than or equal to 1"),
    ],
)
def test_bad_params_name_the_key_and_the_problem(raw, key, why):
    with pytest.raises(ParamsError) as exc:
        params_of(raw)
    message = str(exc.value)
    assert f"  {key}:" in message and why in message


def test_load_params_reports_file_problems(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    write_params(bad, {"train": {"lr": "fast"}})
    with pytest.raises(ParamsError, match=r"params.yaml is invalid:\n  train.lr"):
        load_params(bad)


def test_a_missing_key_is_named_with_its_file(tmp_path):
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    del full["qat"]["channels_last"], full["train"]["model"]["weights"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert str(exc.value) == (
        f"{path} is invalid:\n"
        "  train.model.weights: missing: every key needs a value in the params file (the schema has no defaults)\n"
        "  qat.channels_last: missing: every key needs a value in the params file (the schema has no defaults)")
    with pytest.raises(ParamsError, match="  evaluate: missing"):
        parse_params({key: value for key, value in full.items() if key != "evaluate"})


def test_exponent_floats_read_as_yaml_1_2_does(tmp_path):
    # YAML 1.1 (PyYAML) would read 1e-3 as a string; DVC's YAML 1.2 reader sees a float.
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text.replace("  lr: 0.003\n", "  lr: 1e-3\n").replace("  weight_decay: 0.0001\n", "  weight_decay: 5E-5\n"))
    params = load_params(path)
    assert (params.train.lr, params.train.weight_decay) == (0.001, 5e-05)
