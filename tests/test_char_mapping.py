"""Character mapping: characters the vocabulary lacks are fed as an equivalent it has, one for one,
the same in training, evaluation and prediction, saved with the checkpoint; outputs keep the originals."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, clean_env, make_trainer, tiny_vocab, write_synthetic_splits, write_tiny_bert
from pipeline.alignment import Aligner
from pipeline.char_mapping import build_char_mapping
from pipeline.config import ConfigError, TrainConfig

QUOTED = "“张三”在北京工作…"  # curly quotes and an ellipsis, none of them in the tiny vocabularies
STRAIGHT = '"张三"在北京工作⋯'  # what the mapping derived from QUOTE_VOCAB feeds instead
# A vocabulary with straight quotes and the midline ellipsis, without the curly quotes, dashes or '…'.
QUOTE_VOCAB = tiny_vocab() + ['"', "'", "⋯"]


def tokenizer_of(tmp_path, vocab: list[str]):
    from paddlenlp.transformers import BertTokenizer

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(str(path), do_lower_case=True)


def test_a_character_is_mapped_only_when_unknown_and_to_a_known_piece(tmp_path):
    tokenizer = tokenizer_of(tmp_path, QUOTE_VOCAB + ["“"])  # the left curly quote is known here
    mapping = build_char_mapping(tokenizer)
    assert mapping["”"] == '"' and mapping["‘"] == mapping["’"] == "'" and mapping["…"] == "⋯"
    assert "“" not in mapping, "a character the vocabulary has must stay as it is"
    assert "—" not in mapping, "no candidate of the em dash is in this vocabulary"
    assert mapping["Ａ"] == "A"  # NFKC: full-width letters (lower-cased to 'a' by the tokenizer)
    for character, replacement in mapping.items():
        assert tokenizer.tokenize(character) == [tokenizer.unk_token], character
        pieces = tokenizer.tokenize(replacement)
        assert len(pieces) == 1 and pieces != [tokenizer.unk_token], (character, replacement)
    # Without the straight quotes (or their full-width forms), curly quotes stay [UNK].
    assert "”" not in build_char_mapping(tokenizer_of(tmp_path, tiny_vocab()))


def test_mapped_characters_keep_one_position_each_and_their_labels(tmp_path):
    tokenizer = tokenizer_of(tmp_path, QUOTE_VOCAB)
    mapped, plain = Aligner(tokenizer, 32, build_char_mapping(tokenizer)), Aligner(tokenizer, 32)
    tokens = list(QUOTED)
    labels = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "O"]
    example = type("Example", (), {"tokens": tokens, "labels": labels})()
    label2id = {"B-PER": 0, "I-PER": 1, "B-LOC": 2, "I-LOC": 3, "O": 4}
    ((mapped_ids, mapped_labels),) = mapped.training_features(example, label2id)
    ((plain_ids, plain_labels),) = plain.training_features(example, label2id)
    assert mapped.windows(tokens)[0].first_positions == list(range(1, len(tokens) + 1))
    np.testing.assert_array_equal(mapped_labels, plain_labels)  # every label on its own character
    vocab = {piece: i for i, piece in enumerate(QUOTE_VOCAB)}
    unk = tokenizer.unk_token_id
    assert list(plain_ids[1:-1]).count(unk) == 3 and unk not in mapped_ids
    assert list(mapped_ids[1:-1]) == [vocab[c] for c in STRAIGHT]


@pytest.fixture(scope="module")
def quote_model_dir(tmp_path_factory):
    """A tiny random BERT over ``QUOTE_VOCAB``."""
    return write_tiny_bert(tmp_path_factory.mktemp("quote_bert"), QUOTE_VOCAB, seed=3)


@pytest.fixture(scope="module")
def quoted_dataset_dir(tmp_path_factory):
    """The synthetic corpus with every training sentence between curly quotes (labelled O)."""
    from pipeline.readers import read_examples, write_tsv

    directory = write_synthetic_splits(tmp_path_factory.mktemp("quoted"), {"train": 48, "dev": 8, "test": 8})
    examples, _ = read_examples(directory / "train.tsv")
    write_tsv(directory / "train.tsv", [(["“", *e.tokens, "”"], ["O", *e.labels, "O"]) for e in examples])
    return directory


@pytest.fixture(scope="module")
def trained(quote_model_dir, quoted_dataset_dir, tmp_path_factory):
    """A two-step run (a training state at step 2) and the [UNK] line it logged."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(quote_model_dir, quoted_dataset_dir, out, max_steps=2, save_interval=2, do_test=False)
    logger = logging.getLogger("pipeline.trainer")
    records, level = [], logger.level
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    unk_lines = [r.getMessage() for r in records if r.getMessage().startswith("[UNK] pieces in train")]
    return trainer, out, unk_lines


def test_training_logs_unk_counts_and_saves_the_mapping_with_every_checkpoint(trained):
    trainer, out, unk_lines = trained
    # 48 sentences, each between two curly quotes that the mapping turns into '"'.
    assert len(unk_lines) == 1 and unk_lines[0].startswith("[UNK] pieces in train: 96 (")
    assert "-> 0 (0.00%)" in unk_lines[0] and "with the character mapping" in unk_lines[0]
    assert trainer.aligner.char_mapping["“"] == '"'
    for directory in (out / "best_model", out / "checkpoints" / "step-00000002"):
        saved = json.loads((directory / "char_mapping.json").read_text(encoding="utf-8"))
        assert saved == trainer.aligner.char_mapping, directory


def test_prediction_feeds_the_model_what_training_fed_it(trained):
    from pipeline.predictor import Predictor

    trainer, out, _ = trained
    predictor = Predictor.from_checkpoint(out / "best_model", engine="dynamic")
    tokens = list(QUOTED * 5)
    assert predictor.labeller.aligner.char_mapping == trainer.aligner.char_mapping
    assert ([w.input_ids for w in predictor.labeller.aligner.windows(tokens)]
            == [w.input_ids for w in trainer.aligner.windows(tokens)])
    (example,) = [e for e in trainer.splits.train[:1]]
    training_ids = [ids.tolist() for ids, _ in trainer.aligner.training_features(example, {l: 0 for l in example.labels})]
    assert training_ids == [w.input_ids for w in predictor.labeller.aligner.windows(example.tokens)]


def sharpened_copy(best_model, target):
    """A copy of ``best_model`` whose labels depend on whether a character is [UNK] or a straight quote:
    two training steps leave a model whose labels hardly depend on the characters at all."""
    import paddle

    shutil.copytree(best_model, target)
    state = paddle.load(str(target / "model.pdparams"))
    rng = np.random.default_rng(0)
    embeddings = state["bert.embeddings.word_embeddings.weight"].numpy()
    # Large embeddings for the pieces the mapping feeds: they dominate their positions' hidden states.
    for piece in ('"', "'", "⋯"):
        embeddings[QUOTE_VOCAB.index(piece)] = rng.normal(size=embeddings.shape[1])
    state["bert.embeddings.word_embeddings.weight"] = paddle.to_tensor(embeddings)
    state["classifier.weight"] = paddle.to_tensor(rng.normal(size=state["classifier.weight"].shape).astype("float32"))
    paddle.save(state, str(target / "model.pdparams"))
    return target


def test_predict_py_applies_the_saved_mapping_and_keeps_the_original_text(trained, tmp_path):
    from pipeline.predictor import Predictor

    _, out, _ = trained
    checkpoint = sharpened_copy(out / "best_model", tmp_path / "best_model")
    unmapped = sharpened_copy(out / "best_model", tmp_path / "unmapped")
    (unmapped / "char_mapping.json").unlink()
    texts = [QUOTED, STRAIGHT, "‘李四’去上海"]
    # This model tells [UNK] from '"': the comparison below would fail without the mapping.
    without = Predictor.from_checkpoint(unmapped, engine="dynamic").predict(texts)
    assert without[0]["labels"] != without[1]["labels"]

    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input",
                    str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")],
                   cwd=ROOT, env=clean_env(), check=True, capture_output=True)
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in results] == texts  # the user's curly quotes, not the straight ones
    assert all(e["text"] == r["text"][e["start"]:e["end"]] for r in results for e in r["entities"])
    # The model saw QUOTED exactly as STRAIGHT: the same labels, character for character.
    assert results[0]["labels"] == results[1]["labels"]
    assert results == Predictor.from_checkpoint(checkpoint, engine="dynamic").predict(texts)


def test_a_checkpoint_without_a_mapping_maps_nothing(trained, tmp_path):
    from pipeline.checkpoint import CheckpointError
    from pipeline.predictor import Predictor

    _, out, _ = trained
    old = tmp_path / "old_model"
    shutil.copytree(out / "best_model", old)
    (old / "char_mapping.json").unlink()  # as written before the mapping existed
    predictor = Predictor.from_checkpoint(old, engine="dynamic")
    assert predictor.labeller.aligner.char_mapping == {}
    unk = predictor.labeller.aligner.unk_id
    assert predictor.labeller.aligner.windows(list(QUOTED))[0].input_ids.count(unk) == 3
    # Exactly what an aligner without any mapping gives (the behaviour before the mapping existed).
    plain = Aligner(predictor.labeller.aligner.tokenizer, predictor.labeller.aligner.max_seq_len)
    assert predictor.labeller.aligner.windows(list(QUOTED))[0].input_ids == plain.windows(list(QUOTED))[0].input_ids
    (old / "char_mapping.json").write_text('{"“": ""}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="char_mapping.json.*does not map one character"):
        Predictor.from_checkpoint(old, engine="dynamic")


def test_a_damaged_mapping_makes_a_training_state_damaged(trained, tmp_path):
    from pipeline.checkpoint import training_state_problem

    _, out, _ = trained
    state = tmp_path / "step-00000002"
    shutil.copytree(out / "checkpoints" / "step-00000002", state)
    assert training_state_problem(state) is None
    (state / "char_mapping.json").write_text('{"“": ', encoding="utf-8")  # cut short
    assert "char_mapping.json is not valid JSON" in training_state_problem(state)


def test_resuming_an_old_state_without_a_mapping_continues_without_one(trained, quote_model_dir,
                                                                       quoted_dataset_dir, tmp_path):
    _, out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "step-00000002" / "char_mapping.json").unlink()
    trainer = make_trainer(quote_model_dir, quoted_dataset_dir, run, max_steps=3, do_test=False)
    assert trainer.aligner.char_mapping  # derived for a fresh run...
    trainer.fit()
    assert trainer.progress.step == 3 and trainer.aligner.char_mapping == {}  # ...but the state had none
    assert json.loads((run / "best_model" / "char_mapping.json").read_text()) == {}


def test_char_mapping_off_disables_it(quote_model_dir, quoted_dataset_dir, tmp_path):
    trainer = make_trainer(quote_model_dir, quoted_dataset_dir, tmp_path, char_mapping="off")
    assert trainer.aligner.char_mapping == {}
    assert trainer.aligner.pieces("“") == (trainer.aligner.unk_id,)
    with pytest.raises(ConfigError, match="char_mapping must be one of"):
        TrainConfig(char_mapping="on")
