"""Constrained decoding: valid strict BIO by construction, the best valid sequence, argmax when that is valid;
stitched windows and tokens without pieces stay valid; the checkpoint's decoding is what prediction uses."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from helpers import per_token_model
from pipeline.alignment import Aligner
from pipeline.decoding import DECODINGS, SequenceDecoder, allowed_transitions, log_softmax, viterbi
from pipeline.labels import MSRA_LABELS, bio_labels_for_types, to_bio

SMALL_LABELS = bio_labels_for_types(["A", "B"])  # B-A I-A B-B I-B O


def is_strict_bio(tags: list[str]) -> bool:
    """Independent of the decoder: strict BIO is what the BIO reader has nothing to repair in."""
    return to_bio(list(tags), "bio")[1].opened_span_repaired == 0


def random_label_list(rng) -> list[str]:
    """A BIO label list of 1-4 types in a random order (the decoder must not assume PaddleHub's)."""
    labels = bio_labels_for_types([f"T{i}" for i in range(int(rng.integers(1, 5)))])
    return [labels[i] for i in rng.permutation(len(labels))]


def test_the_allowed_moves_are_strict_bios():
    start, moves = allowed_transitions(MSRA_LABELS)
    index = {label: i for i, label in enumerate(MSRA_LABELS)}
    assert [MSRA_LABELS[i] for i in np.flatnonzero(~start)] == ["I-PER", "I-ORG", "I-LOC"]
    for before in MSRA_LABELS:
        for after in MSRA_LABELS:
            expected = not after.startswith("I-") or (before != "O" and before[2:] == after[2:])
            assert moves[index[before], index[after]] == expected, (before, after)
    assert moves[index["O"], index["I-PER"]] == moves[index["B-LOC"], index["I-PER"]] == False  # noqa: E712
    assert moves[index["B-PER"], index["I-PER"]] and moves[index["I-PER"], index["I-PER"]]


@pytest.mark.parametrize("seed", range(10))
def test_constrained_output_is_always_valid_for_random_logits(seed):
    rng = np.random.default_rng(seed)
    invalid_argmax = 0
    for _ in range(100):
        labels = random_label_list(rng)
        steps = int(rng.integers(0, 40))
        logits = rng.normal(size=(steps, len(labels))).astype(np.float32) * rng.uniform(0.1, 8)
        decoded = [labels[i] for i in SequenceDecoder(labels).decode(logits)]
        assert len(decoded) == steps and is_strict_bio(decoded), decoded
        invalid_argmax += not is_strict_bio([labels[i] for i in logits.argmax(-1)])
        # The CRF path too, under random learnt transitions.
        transitions = rng.normal(size=(len(labels), len(labels))) * 3
        crf = [labels[i] for i in SequenceDecoder(labels).decode(logits, transitions)]
        assert is_strict_bio(crf), crf
    assert invalid_argmax > 50  # most random cases needed the constraint


def test_constrained_equals_argmax_when_argmax_is_valid():
    rng = np.random.default_rng(0)
    decoder = SequenceDecoder(MSRA_LABELS)
    checked = 0
    while checked < 200:
        logits = rng.normal(size=(int(rng.integers(1, 12)), len(MSRA_LABELS))) * 2
        argmax = logits.argmax(-1)
        if not decoder.is_valid(argmax):
            continue
        assert decoder.decode(logits).tolist() == argmax.tolist()
        # The Viterbi itself (not only the shortcut that skips it) finds the argmax.
        assert viterbi(log_softmax(logits), decoder.forbidden_moves, decoder.start_scores).tolist() == argmax.tolist()
        checked += 1


def best_valid_by_brute_force(scores, labels, transitions=None):
    steps = len(scores)
    candidates = [path for path in itertools.product(range(len(labels)), repeat=steps)
                  if is_strict_bio([labels[i] for i in path])]
    transitions = np.zeros((len(labels), len(labels))) if transitions is None else transitions
    return list(max(candidates, key=lambda path: scores[np.arange(steps), path].sum()
                    + sum(transitions[a, b] for a, b in zip(path, path[1:]))))


@pytest.mark.parametrize("seed", range(30))
def test_constrained_equals_the_brute_force_best_valid_sequence(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(1, 6))
    logits = rng.normal(size=(steps, len(SMALL_LABELS))) * 3
    decoder = SequenceDecoder(SMALL_LABELS)
    assert decoder.decode(logits).tolist() == best_valid_by_brute_force(log_softmax(logits), SMALL_LABELS)
    transitions = rng.normal(size=(len(SMALL_LABELS), len(SMALL_LABELS))) * 2
    assert decoder.decode(logits, transitions).tolist() == best_valid_by_brute_force(logits, SMALL_LABELS,
                                                                                     transitions)


def test_argmax_decoding_is_the_unconstrained_one():
    rng = np.random.default_rng(3)
    logits, transitions = rng.normal(size=(20, 7)) * 4, rng.normal(size=(7, 7))
    decoder = SequenceDecoder(MSRA_LABELS, "argmax")
    assert decoder.decode(logits).tolist() == logits.argmax(-1).tolist()
    assert decoder.decode(logits, transitions).tolist() == viterbi(logits, transitions).tolist()
    assert SequenceDecoder(MSRA_LABELS).decode(np.zeros((0, 7))).tolist() == []
    with pytest.raises(ValueError, match="decoding must be one of"):
        SequenceDecoder(MSRA_LABELS, "beam")
    assert DECODINGS == ("constrained", "argmax")


# ---------------------------------------------------------------- through TokenLabeller


class TableEngine:
    """Logits that depend on the piece id alone (any engine will do for TokenLabeller)."""

    name = "table"

    def __init__(self, table: np.ndarray, transitions: np.ndarray | None = None):
        self.table, self._transitions = table.astype(np.float32), transitions

    def logits(self, input_ids):
        return self.table[input_ids]

    def transitions(self):
        return self._transitions


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from paddlenlp.transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(tiny_model_dir))


def labeller_for(tokenizer, engine, max_seq_len, decoding="constrained"):
    from pipeline.labeller import TokenLabeller

    return TokenLabeller(engine, Aligner(tokenizer, max_seq_len), MSRA_LABELS, batch_size=4, decoding=decoding)


@pytest.mark.parametrize("head", ["linear", "crf"])
def test_windows_are_decoded_after_stitching_into_valid_sequences(tokenizer, head):
    rng = np.random.default_rng(5)
    table = rng.normal(size=(len(tokenizer.vocab), len(MSRA_LABELS))) * 3
    transitions = rng.normal(size=(7, 7)) if head == "crf" else None
    text = list(rng.choice(list("张三在北京工作2022年访问nasa，李四去上海  "), size=500))  # spaces: no pieces
    whole = labeller_for(tokenizer, TableEngine(table, transitions), 1024)
    short = labeller_for(tokenizer, TableEngine(table, transitions), 16)
    assert len(short.aligner.windows(text, overlap=short.overlap)) > 40
    windowed = short.label([text])[0]
    assert is_strict_bio(windowed) and len(windowed) == len(text)
    # Each token's scores do not depend on its window here, so decoding the stitched sentence at once
    # gives exactly the labels of one window over everything.
    assert windowed == whole.label([text])[0]
    unconstrained = labeller_for(tokenizer, TableEngine(table, transitions), 12, "argmax").label([text])[0]
    assert not is_strict_bio(unconstrained) and unconstrained != windowed  # the constraint had work to do


def test_tokens_without_pieces_continue_a_span_or_are_outside(tokenizer):
    vocab = tokenizer.vocab
    table = np.zeros((len(vocab), len(MSRA_LABELS)))
    table[:, MSRA_LABELS.index("O")] = 5.0
    for char, label in (("张", "B-PER"), ("三", "I-PER"), ("北", "B-LOC"), ("京", "I-LOC")):
        table[vocab[char]] = 0.0
        table[vocab[char], MSRA_LABELS.index(label)] = 5.0
        table[vocab[char], MSRA_LABELS.index("B-" + label[2:])] += 2.0  # second best: opening the span
    labeller = labeller_for(tokenizer, TableEngine(table), 64)
    texts = ["张 三在", "在 三", " 三", "张 北 京 ", "北京 \u3000 京"]
    labels = labeller.label([list(t) for t in texts])
    assert labels[0] == ["B-PER", "I-PER", "I-PER", "O"]  # a space inside a name belongs to it
    # 三 alone would be an I-PER after O: it opens the entity instead, and the space before it stays O.
    assert labels[1] == ["O", "O", "B-PER"] and labels[2] == ["O", "B-PER"]
    # A space between two types, or after the last entity, is O; inside 北 京 it is I-LOC.
    assert labels[3] == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert labels[4] == ["B-LOC"] + ["I-LOC"] * 5
    assert all(is_strict_bio(row) for row in labels)
    argmax = labeller_for(tokenizer, TableEngine(table), 64, "argmax").label([list(t) for t in texts])
    assert argmax[1] == ["O", "O", "I-PER"]  # what the constraint repaired


# ---------------------------------------------------------------- checkpoints, predict.py, evaluate CLI


@pytest.fixture(scope="module")
def saved_model(tiny_model_dir, tokenizer):
    """A tiny classifier with a large random head (varied, often invalid argmax labels)."""
    import paddle

    from pipeline.models import build_token_classifier, resolve_model

    paddle.seed(4)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS)
    model.classifier.weight.set_value(paddle.randn(model.classifier.weight.shape) * 3)
    return model


def save_checkpoint(directory, model, tokenizer, model_dir, **config):
    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.config import TrainConfig

    save_model_checkpoint(directory, model, tokenizer, TrainConfig(model=str(model_dir), max_seq_len=32, **config),
                          MSRA_LABELS, metrics={})
    return directory


TEXTS = ["张三在北京工作。", "李四 去上海，王小明在清华大学读书", "新华社北京5月7日电" * 12, "", "王"]


def test_the_checkpoint_records_its_decoding_and_predict_uses_it(saved_model, tokenizer, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    import predict
    from pipeline.predictor import Predictor

    argmax_dir = save_checkpoint(tmp_path / "argmax", saved_model, tokenizer, tiny_model_dir, decoding="argmax")
    default_dir = save_checkpoint(tmp_path / "default", saved_model, tokenizer, tiny_model_dir)
    assert json.loads((argmax_dir / "pipeline.json").read_text())["decoding"] == "argmax"
    assert json.loads((default_dir / "pipeline.json").read_text())["decoding"] == "constrained"
    constrained = [r["labels"] for r in Predictor.from_checkpoint(default_dir).predict(TEXTS)]
    assert all(is_strict_bio(labels) for labels in constrained)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    written = {}
    for name, directory in (("argmax", argmax_dir), ("default", default_dir)):
        out = tmp_path / f"{name}.jsonl"
        assert predict.main(["--checkpoint", str(directory), "--input", str(source), "--output", str(out)]) == 0
        written[name] = [json.loads(line)["labels"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert written["default"] == constrained
    assert written["argmax"] == [r["labels"] for r in
                                 Predictor.from_checkpoint(default_dir, decoding="argmax").predict(TEXTS)]
    assert not all(is_strict_bio(labels) for labels in written["argmax"])  # argmax was honoured


def test_an_old_checkpoint_without_decoding_loads_constrained_and_a_bad_value_is_refused(
        saved_model, tokenizer, tiny_model_dir, tmp_path, capsys):
    import predict
    from pipeline.checkpoint import CheckpointError
    from pipeline.predictor import Predictor

    directory = save_checkpoint(tmp_path / "old", saved_model, tokenizer, tiny_model_dir, decoding="argmax")
    meta_path = directory / "pipeline.json"
    meta = json.loads(meta_path.read_text())
    del meta["decoding"]  # what checkpoints written before the key look like
    meta_path.write_text(json.dumps(meta))
    predictor = Predictor.from_checkpoint(directory)
    assert predictor.labeller.decoding == "constrained"
    assert all(is_strict_bio(r["labels"]) for r in predictor.predict(TEXTS))
    meta_path.write_text(json.dumps({**meta, "decoding": "greedy"}))
    with pytest.raises(CheckpointError, match=r"pipeline.json: decoding must be one of .*'greedy'"):
        Predictor.from_checkpoint(directory)
    source = tmp_path / "in.txt"
    source.write_text("张三\n", encoding="utf-8")
    assert predict.main(["--checkpoint", str(directory), "--input", str(source)]) == 2
    err = capsys.readouterr().err
    assert "decoding must be one of" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="decoding must be one of"):
        Predictor.from_checkpoint(directory, decoding="greedy")


def test_evaluate_cli_decoding_overrides_the_checkpoints(saved_model, tokenizer, tiny_model_dir, tiny_dataset_dir,
                                                         tmp_path, capsys):
    from pipeline import evaluate

    directory = save_checkpoint(tmp_path / "ckpt", saved_model, tokenizer, tiny_model_dir)
    predicted, summaries = {}, {}
    for decoding in (None, "argmax", "constrained"):
        out = tmp_path / f"{decoding}.jsonl"
        flags = [] if decoding is None else ["--decoding", decoding]
        assert evaluate.main(["--checkpoint", str(directory), "--file", str(tiny_dataset_dir / "test.tsv"),
                              "--predictions", str(out), *flags]) == 0
        summaries[decoding] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        predicted[decoding] = [json.loads(line)["predicted"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert summaries[None]["decoding"] == "constrained" and summaries["argmax"]["decoding"] == "argmax"
    assert predicted[None] == predicted["constrained"] and all(is_strict_bio(p) for p in predicted[None])
    assert not all(is_strict_bio(p) for p in predicted["argmax"])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(directory), "--file", "x.tsv", "--decoding", "beam"])
    assert "invalid choice: 'beam'" in capsys.readouterr().err


def test_the_trainer_evaluates_with_the_configs_decoding(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from helpers import make_trainer

    for decoding in DECODINGS:
        trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / decoding, decoding=decoding)
        assert trainer.labeller().decoding == decoding


def test_per_token_model_windows_stay_identical_under_both_decodings(tokenizer):
    """The shared per-token model helper: constrained labels over windows equal one window's."""
    from pipeline.engines import DynamicEngine

    model = per_token_model(len(tokenizer.vocab), len(MSRA_LABELS), seed=2)
    text = list("张三在北京工作 访问nasa😀，" * 30)
    for decoding in DECODINGS:
        whole = labeller_for(tokenizer, DynamicEngine(model), 1024, decoding).label([text])[0]
        assert labeller_for(tokenizer, DynamicEngine(model), 16, decoding).label([text])[0] == whole


def test_decoding_is_a_config_key_defaulting_to_constrained():
    from pipeline.config import ConfigError, TrainConfig, load_config

    assert TrainConfig().decoding == "constrained" and load_config(None, ["decoding=argmax"]).decoding == "argmax"
    with pytest.raises(ConfigError, match="decoding must be one of"):
        load_config(None, ["decoding=beam"])


@pytest.mark.slow
def test_predict_workers_honour_the_checkpoints_decoding(saved_model, tokenizer, tiny_model_dir, tmp_path,
                                                         monkeypatch):
    import predict
    from pipeline.predictor import Predictor

    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS * 4) + "\n", encoding="utf-8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for decoding in DECODINGS:
        directory = save_checkpoint(tmp_path / decoding, saved_model, tokenizer, tiny_model_dir, decoding=decoding)
        expected = [r["labels"] for r in Predictor.from_checkpoint(directory).predict(TEXTS * 4)]
        out = tmp_path / f"{decoding}.jsonl"
        assert predict.main(["--checkpoint", str(directory), "--input", str(source), "--output", str(out),
                             "--workers", "2"]) == 0
        assert [json.loads(line)["labels"] for line in out.read_text(encoding="utf-8").splitlines()] == expected
        assert all(is_strict_bio(labels) for labels in expected) == (decoding == "constrained")
