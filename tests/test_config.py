"""Config: YAML, overrides, rejection of unknown keys, wrong types and impossible values."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig, field_docs, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nbatch_size: 8\nlearning_rate: 3e-5\n", encoding="utf-8")
    config = load_config(str(path), ["batch_size=4", "labels=[B-X, I-X, O]", "use_vdl=false"])
    assert (config.epochs, config.batch_size, config.learning_rate) == (2, 4, 3e-5)
    assert config.labels == ["B-X", "I-X", "O"] and config.use_vdl is False
    assert config.max_seq_len == TrainConfig().max_seq_len


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown key(s) ['epoch']"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("batch_size=eight", "batch_size must be an integer"),
    ("epochs=1.5", "epochs must be an integer"),
    ("use_gpu=maybe", "use_gpu must be one of ['auto', 'true', 'false']"),
    ("compare_metrics=accuracy", "compare_metrics must be one of"),
    ("amp_level=O3", "amp_level must be one of"),
    ("decoding=viterbi", "decoding must be one of ['constrained', 'argmax'], got 'viterbi'"),
    ("warmup_ratio=1.5", "warmup_ratio must be in [0, 1)"),
    ("learning_rate=0", "learning_rate must be > 0"),
    ("layer_lr_decay=0", "layer_lr_decay must be in (0, 1], got 0"),
    ("layer_lr_decay=1.2", "layer_lr_decay must be in (0, 1], got 1.2"),
    ("labels=[B-X, I-X]", "labels must contain 'O'"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)


def test_off_on_yes_no_stay_words_for_string_choices(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans, which made `resume=off` fail ("must be a string, got
    False"); only true/false are booleans here, in overrides and files alike."""
    path = tmp_path / "c.yaml"
    path.write_text("amp: off\nchar_mapping: off\n", encoding="utf-8")
    config = load_config(str(path), ["resume=off", "overwrite=true", "use_gpu=false"])
    assert (config.resume, config.amp, config.char_mapping) == ("off", "off", "off")
    assert config.overwrite is True and config.use_gpu == "false"
    with pytest.raises(ConfigError, match="resume must be auto, off or an existing checkpoint directory, got 'on'"):
        load_config(None, ["resume=on"])
    with pytest.raises(ConfigError, match="overwrite must be true or false, got 'yes'"):
        load_config(None, ["overwrite=yes"])


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nbatchsize: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) \['batchsize'\]"):
        load_config(str(path))
    path.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))


def test_cross_field_checks_see_the_merged_config(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("use_gpu: true\n", encoding="utf-8")
    assert load_config(str(path), ["amp=fp16"]).amp == "fp16"


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["epochs=7", "labels=[B-X, I-X, O]", "lower_case=true"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == config


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_is_a_valid_config(preset):
    assert isinstance(load_config(str(preset)), TrainConfig)


def test_presets_exist_and_every_key_is_documented():
    assert list(CONFIGS.glob("*.yaml")), "configs/ holds no preset"
    assert all(doc for doc in field_docs().values())
