"""Tests of pipeline.models: model resolution, offline checks, building and rebuilding classifiers.

Every model here is a tiny random BERT built in the test; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import numpy as np
import paddle
import paddlenlp.transformers as transformers
import pytest

import pipeline
from helpers import ROOT, make_torch_dir, numpy_state, tiny_bert_config, write_tokenizer
from pipeline import models

LABELS = ["B-PER", "I-PER", "B-LOC", "I-LOC", "O"]
# PaddleHub's token-classification modules (modules/text/language_model/): the table must cover exactly these.
PADDLEHUB_NAMES = [
    "ernie", "ernie_tiny", "ernie_v2_eng_base", "ernie_v2_eng_large", "bert-base-cased",
    "bert-base-uncased", "bert-large-cased", "bert-large-uncased", "bert-base-multilingual-cased",
    "bert-base-multilingual-uncased", "bert-base-chinese", "chinese-bert-wwm", "chinese-bert-wwm-ext",
    "roberta-wwm-ext", "roberta-wwm-ext-large", "rbt3", "rbtl3", "electra-small", "electra-base",
    "electra-large", "chinese-electra-base", "chinese-electra-small",
]


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    """A tiny random BertModel saved in Paddle layout, with a vocab, and its parameters."""
    paddle.seed(7)
    directory = tmp_path_factory.mktemp("tiny_bert_paddle")
    encoder = transformers.BertModel(tiny_bert_config())
    encoder.save_pretrained(str(directory))
    write_tokenizer(directory, do_lower_case=True)
    return directory, numpy_state(encoder), encoder.config


@pytest.fixture
def torch_bert_dir(saved_bert, tmp_path):
    """The same tiny BERT in Hugging Face PyTorch layout (fresh per test: conversion writes into it)."""
    _, state, config = saved_bert
    return make_torch_dir(tmp_path / "tiny_bert_torch", state, config), state


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything resolves a host name or opens a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use during an offline step: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_model_cache(tmp_path, monkeypatch):
    """PaddleNLP's model cache pointed at an empty directory for this test."""
    from paddlenlp.utils import env

    cache = tmp_path / "ppnlp_home" / "models"
    cache.mkdir(parents=True)
    monkeypatch.setattr(env, "MODEL_HOME", str(cache))
    return cache


@pytest.fixture
def fake_assets(monkeypatch):
    """Stand-in for pipeline.asset_cache (another stage); returns a setter for m3e-small's directory."""
    fake = types.ModuleType("pipeline.asset_cache")
    location = {}
    fake.model_dir = lambda name: location[name]
    monkeypatch.setitem(sys.modules, "pipeline.asset_cache", fake)
    monkeypatch.setattr(pipeline, "asset_cache", fake, raising=False)
    return lambda path: location.__setitem__("m3e-small", str(path))


# ---------------------------------------------------------------- name resolution


def test_paddlehub_table_covers_exactly_the_paddlehub_models():
    assert sorted(models.PADDLEHUB_TO_PADDLENLP) == sorted(PADDLEHUB_NAMES)


@pytest.mark.parametrize("hub_name", PADDLEHUB_NAMES)
def test_every_paddlehub_name_resolves_offline_to_a_token_classifier(hub_name, no_network):
    spec = models.resolve_model(hub_name)

    assert spec.source == "paddlenlp"
    assert spec.name == models.PADDLEHUB_TO_PADDLENLP[hub_name]
    assert spec.alias == hub_name
    assert issubclass(spec.token_classifier_class, transformers.PretrainedModel)
    assert spec.token_classifier_class.__name__.endswith("ForTokenClassification")
    assert spec.token_classifier_class.__name__.lower().startswith(spec.model_type)
    # The family really knows the name: configuration, weights URL and tokenizer files.
    assert spec.name in spec.token_classifier_class.pretrained_init_configuration
    assert spec.name in spec.config_class.pretrained_init_configuration
    assert spec.name in spec.token_classifier_class.pretrained_resource_files_map["model_state"]
    assert spec.name in spec.tokenizer_class.pretrained_init_configuration
    assert spec.token_classifier_class.config_class is spec.config_class


def test_ernie_tiny_gets_its_own_word_segmenting_tokenizer():
    assert models.resolve_model("ernie_tiny").tokenizer_class is transformers.ErnieTinyTokenizer


@pytest.mark.parametrize(
    "name, classifier",
    [
        ("ernie-3.0-medium-zh", "ErnieForTokenClassification"),
        ("ernie-3.0-tiny-nano-v2-zh", "ErnieForTokenClassification"),
        ("uer/chinese-roberta-base", "BertForTokenClassification"),
        ("hfl/rbt3", "RobertaForTokenClassification"),
    ],
)
def test_paddlenlp_names_resolve_by_the_family_that_lists_them(name, classifier, no_network):
    spec = models.resolve_model(name)

    assert spec.source == "paddlenlp" and spec.name == name and spec.alias is None
    assert spec.token_classifier_class is getattr(transformers, classifier)
    assert name in spec.config_class.pretrained_init_configuration


def test_unknown_names_raise_value_error_listing_what_is_accepted(tmp_path):
    with pytest.raises(ValueError) as error:
        models.resolve_model("ernie-3.0-medum-zh")
    message = str(error.value)
    assert "'ernie-3.0-medium-zh'" in message  # the close match is suggested
    assert "m3e-small" in message and "rbt3" in message and "pytorch_model.bin" in message

    with pytest.raises(ValueError):
        models.resolve_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError, match="config.json"):
        models.resolve_model(str(tmp_path))  # a directory, but not a model


def test_directory_of_an_unsupported_family_is_rejected(tmp_path):
    # ERNIE-M's class names start with "Ernie" but it is another architecture.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ErnieMModel"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="supported"):
        models.resolve_model(str(tmp_path))


def test_directory_family_comes_from_model_type_or_architectures(tmp_path):
    legacy = tmp_path / "legacy"  # PaddleNLP < 2.5 wrote init_class, no model_type
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"init_class": "ErnieModel"}), encoding="utf-8")
    assert models.resolve_model(str(legacy)).token_classifier_class is transformers.ErnieForTokenClassification

    hf_ernie = tmp_path / "hf_ernie"  # PaddleNLP 2.8.1 has no PyTorch converter for ERNIE
    hf_ernie.mkdir()
    (hf_ernie / "config.json").write_text(
        json.dumps({"model_type": "ernie", "transformers_version": "4.30.0"}), encoding="utf-8"
    )
    (hf_ernie / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot convert"):
        models.resolve_model(str(hf_ernie))


# ---------------------------------------------------------------- local directories


def test_paddle_dir_builds_a_classifier_on_the_saved_encoder(saved_bert, tmp_path, no_network):
    directory, encoder_state, _ = saved_bert
    spec = models.resolve_model(str(directory))

    assert (spec.source, spec.model_type, spec.name) == ("paddle_dir", "bert", str(directory))
    assert spec.token_classifier_class is transformers.BertForTokenClassification
    assert models.check_weights_available(spec) is None

    model = models.build_token_classifier(spec, LABELS)

    loaded = numpy_state(model.bert)
    assert loaded.keys() == encoder_state.keys()
    for name, value in encoder_state.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert list(model.classifier.weight.shape) == [32, len(LABELS)]
    assert list(model.classifier.bias.shape) == [len(LABELS)]
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {label: index for index, label in enumerate(LABELS)}


def test_label_maps_survive_config_save_and_rebuild(saved_bert, tmp_path, no_network):
    directory, _, _ = saved_bert
    model = models.build_token_classifier(models.resolve_model(str(directory)), LABELS)
    model.eval()
    checkpoint = tmp_path / "checkpoint"
    model.config.save_pretrained(str(checkpoint))

    rebuilt = models.token_classifier_from_config_dir(str(checkpoint))
    rebuilt.set_state_dict(model.state_dict())
    rebuilt.eval()

    assert type(rebuilt) is transformers.BertForTokenClassification
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    assert rebuilt.config.id2label == dict(enumerate(LABELS))
    assert rebuilt.config.label2id == model.config.label2id
    assert list(rebuilt.classifier.weight.shape) == [32, len(LABELS)]
    input_ids = paddle.to_tensor([[2, 5, 6, 7, 3]])
    np.testing.assert_allclose(
        models.token_logits(rebuilt, input_ids).numpy(), models.token_logits(model, input_ids).numpy(), rtol=1e-6
    )


def test_rebuild_refuses_a_config_without_labels(saved_bert):
    directory, _, _ = saved_bert  # a BertModel config: no id2label
    with pytest.raises(ValueError, match="id2label"):
        models.token_classifier_from_config_dir(str(directory))


def test_torch_dir_resolves_and_converts_to_the_same_encoder(torch_bert_dir, no_network):
    directory, encoder_state = torch_bert_dir
    spec = models.resolve_model(str(directory))

    assert (spec.source, spec.model_type) == ("torch_dir", "bert")
    assert spec.tokenizer_class is transformers.BertTokenizer
    models.check_weights_available(spec)

    model = models.build_token_classifier(spec, LABELS)

    loaded = numpy_state(model.bert)
    for name, value in encoder_state.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert list(model.classifier.weight.shape) == [32, len(LABELS)]
    # PaddleNLP caches the conversion next to the PyTorch file (hence the writability check)
    # and loads that cache the next time; the directory still resolves as torch_dir.
    assert (directory / "model_state.pdparams").is_file()
    spec_again = models.resolve_model(str(directory))
    assert spec_again.source == "torch_dir"
    reloaded = numpy_state(models.build_token_classifier(spec_again, LABELS).bert)
    for name, value in encoder_state.items():
        np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


def test_read_only_torch_dir_is_reported_before_conversion(torch_bert_dir, monkeypatch):
    directory, _ = torch_bert_dir
    spec = models.resolve_model(str(directory))
    # Tests may run as root, for whom chmod does not take write access away.
    monkeypatch.setattr(models.os, "access", lambda path, mode: False)
    with pytest.raises(models.ModelUnavailableError, match="not writable"):
        models.check_weights_available(spec)


def test_directory_without_weights_is_unavailable(saved_bert, tmp_path):
    directory, _, _ = saved_bert
    paddle_copy = tmp_path / "paddle_no_weights"
    paddle_copy.mkdir()
    shutil.copy(directory / "config.json", paddle_copy / "config.json")
    spec = models.resolve_model(str(paddle_copy))
    assert spec.source == "paddle_dir"
    with pytest.raises(models.ModelUnavailableError, match=re.escape(str(paddle_copy / "model_state.pdparams"))):
        models.check_weights_available(spec)

    torch_copy = tmp_path / "torch_no_weights"
    torch_copy.mkdir()
    (torch_copy / "config.json").write_text(
        json.dumps({"model_type": "bert", "transformers_version": "4.30.0"}), encoding="utf-8"
    )
    spec = models.resolve_model(str(torch_copy))
    assert spec.source == "torch_dir"
    with pytest.raises(models.ModelUnavailableError, match="pytorch_model.bin"):
        models.check_weights_available(spec)


# ---------------------------------------------------------------- m3e-small


def test_m3e_small_resolves_to_the_assets_directory(torch_bert_dir, fake_assets, no_network):
    directory, _ = torch_bert_dir
    fake_assets(directory)

    spec = models.resolve_model("m3e-small")

    assert (spec.name, spec.source, spec.model_type, spec.alias) == (str(directory), "torch_dir", "bert", "m3e-small")
    models.check_weights_available(spec)


def test_m3e_small_not_fetched_says_how_to_fetch_it(tmp_path, fake_assets, no_network):
    fake_assets(tmp_path / "not-fetched" / "m3e-small")

    spec = models.resolve_model("m3e-small")

    assert (spec.source, spec.model_type) == ("torch_dir", "bert")
    with pytest.raises(models.ModelUnavailableError, match=re.escape("python -m pipeline.assets fetch")):
        models.check_weights_available(spec)


# ---------------------------------------------------------------- named models offline


def test_named_model_not_cached_and_hub_unreachable_fails_fast(empty_model_cache, monkeypatch):
    port = _closed_port()
    monkeypatch.setattr(models, "_url_host_port", lambda url: ("127.0.0.1", port))
    spec = models.resolve_model("ernie-3.0-medium-zh")

    started = time.monotonic()
    with pytest.raises(models.ModelUnavailableError) as error:
        models.check_weights_available(spec)
    elapsed = time.monotonic() - started

    assert elapsed < 5
    message = str(error.value)
    assert "ernie-3.0-medium-zh" in message
    assert str(empty_model_cache) in message  # where it looked
    assert f"127.0.0.1:{port}" in message
    assert "copy" in message and "local model directory" in message and "pipeline.assets fetch" in message


def test_unreachable_probe_is_bounded_by_its_timeout(monkeypatch):
    # A resolver that hangs (as on some offline machines) must not hang the check.
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: time.sleep(30))
    started = time.monotonic()
    assert models._host_answers("bj.bcebos.com", 443, timeout=0.5) is False
    assert time.monotonic() - started < 2


def test_named_model_in_cache_needs_no_network(empty_model_cache, no_network):
    spec = models.resolve_model("rbt3")
    cached = empty_model_cache / "hfl" / "rbt3"
    cached.mkdir(parents=True)
    (cached / "model_state.pdparams").write_bytes(b"weights")
    (cached / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")

    assert models.check_weights_available(spec) is None


def test_named_model_passes_when_the_hub_answers(empty_model_cache, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(models, "_url_host_port", lambda url: ("127.0.0.1", port))

        assert models.check_weights_available(models.resolve_model("ernie-3.0-medium-zh")) is None


def test_model_cache_follows_ppnlp_home_in_a_fresh_process(tmp_path):
    # PaddleNLP reads PPNLP_HOME once, at import: only a new process shows it is honoured.
    home = tmp_path / "ppnlp_home"
    home.mkdir()
    script = (
        "from pipeline import models\n"
        f"models._url_host_port = lambda url: ('127.0.0.1', {_closed_port()})\n"
        "try:\n"
        "    models.check_weights_available(models.resolve_model('ernie-3.0-medium-zh'))\n"
        "except models.ModelUnavailableError as error:\n"
        "    print('UNAVAILABLE', error)\n"
    )
    env = dict(os.environ, PPNLP_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNAVAILABLE" in result.stdout
    assert str(home / "models" / "ernie-3.0-medium-zh") in result.stdout


# ---------------------------------------------------------------- tokenizer and logits


def test_lower_case_overrides_the_saved_tokenizer_setting(torch_bert_dir):
    directory, _ = torch_bert_dir  # saved with do_lower_case=false, vocabulary lower-case only
    spec = models.resolve_model(str(directory))

    as_saved = models.build_tokenizer(spec)
    lowered = models.build_tokenizer(spec, lower_case=True)

    assert as_saved.tokenize("A b") == ["[UNK]", "b"]
    assert lowered.tokenize("A b") == ["a", "b"]
    assert models.build_tokenizer(models.resolve_model(str(directory)), lower_case=False).tokenize("A") == ["[UNK]"]


def test_token_logits_shape_for_every_output_form(saved_bert):
    directory, _, _ = saved_bert
    model = models.build_token_classifier(models.resolve_model(str(directory)), LABELS)
    model.eval()
    input_ids = paddle.to_tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    token_type_ids = paddle.zeros_like(input_ids)

    plain = models.token_logits(model, input_ids, token_type_ids)
    assert list(plain.shape) == [2, 6, len(LABELS)]

    model.config.output_hidden_states = True  # PaddleNLP then returns a tuple
    assert isinstance(model(input_ids), tuple)
    np.testing.assert_allclose(models.token_logits(model, input_ids, token_type_ids).numpy(), plain.numpy(), rtol=1e-6)

    model.config.output_hidden_states = False
    model.config.return_dict = True  # ... and a TokenClassifierOutput here
    np.testing.assert_allclose(models.token_logits(model, input_ids, token_type_ids).numpy(), plain.numpy(), rtol=1e-6)


def test_labels_must_be_unique(saved_bert):
    directory, _, _ = saved_bert
    with pytest.raises(ValueError, match="B-PER"):
        models.build_token_classifier(models.resolve_model(str(directory)), ["B-PER", "O", "B-PER"])
