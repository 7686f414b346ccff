import pytest

from tasks.errors import ParamsError
from tasks.params import Params, load_params, parse_params

from conftest import REPO, write_params


def test_repo_params_file_is_valid_and_matches_schema_defaults():
    # params.yaml is the single source of knobs; the schema's defaults must not drift from it.
    assert load_params(REPO / "params.yaml") == Params()


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
        parse_params(raw)
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


def test_partial_params_fill_in_defaults():
    params = parse_params({"train": {"epochs": 3}})
    assert params.train.epochs == 3 and params.train.lr == Params().train.lr


def test_exponent_floats_read_as_yaml_1_2_does(tmp_path):
    # YAML 1.1 (PyYAML) would read 1e-3 as a string; DVC's YAML 1.2 reader sees a float.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-5\n")
    params = load_params(path)
    assert (params.train.lr, params.train.weight_decay) == (0.001, 5e-05)
