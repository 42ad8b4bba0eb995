import json

import pytest

from instret.config import FORMAT_VERSION, TrainConfig, read_config_file
from instret.errors import InstretError


def test_round_trip_through_plain_dict_and_json():
    cfg = TrainConfig(arch="resnet18", epochs=7, lr_milestones=(0.5,), crop_scale=(0.3, 0.9))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["format_version"] == FORMAT_VERSION
    assert TrainConfig.from_dict(d) == cfg


def test_unknown_key_and_newer_version_are_refused():
    with pytest.raises(InstretError, match="unknown configuration key"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(InstretError, match="format version"):
        TrainConfig.from_dict({"format_version": FORMAT_VERSION + 1})


@pytest.mark.parametrize(
    "bad", [{"epochs": 0}, {"loss": "hinge"}, {"tau": 0}, {"bank_momentum": 1.0}, {"batch_size": 1}]
)
def test_invalid_values_are_refused(bad):
    with pytest.raises(InstretError):
        TrainConfig.from_dict(bad)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nbatch-size: 16\n")
    (tmp_path / "c.json").write_text('{"lr": 0.1}')
    assert read_config_file(tmp_path / "c.yaml") == {"epochs": 3, "batch_size": 16}
    assert read_config_file(tmp_path / "c.json") == {"lr": 0.1}


def test_yaml_is_plain_data_only(tmp_path):
    (tmp_path / "evil.yaml").write_text("epochs: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(InstretError, match="cannot parse"):
        read_config_file(tmp_path / "evil.yaml")


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(InstretError, match="cannot read"):
        read_config_file(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InstretError, match="mapping"):
        read_config_file(tmp_path / "list.yaml")


def test_a_config_written_with_the_old_empty_extra_field_still_loads():
    from instret.config import TrainConfig

    old = {**TrainConfig().to_dict(), "extra": {}}
    assert TrainConfig.from_dict(old) == TrainConfig()
