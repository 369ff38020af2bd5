"""Readers, their errors, and token alignment."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.alignment import Aligner, build_training_features, fill_tokens_without_pieces, plan_windows
from pipeline.collate import TrainingCollator
from pipeline.labels import IGNORE_INDEX
from pipeline.readers import DataError, check_labels, label_list_from, read_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from paddlenlp.transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(tiny_model_dir))


# ---------------------------------------------------------------- readers


def test_tsv_reader_reads_paddlehub_layout_and_converts_bmes(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text_a\tlabel\n张\x02三\x02去\x02北\x02京\tB-PER\x02E-PER\x02O\x02B-LOC\x02E-LOC\n"
                    "李\x02四\tS-PER\x02S-PER\n", encoding="utf-8")
    examples, stats = read_examples(path)
    assert [e.tokens for e in examples] == [list("张三去北京"), list("李四")]
    assert examples[0].labels == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    # Adjacent single-character entities of one type stay two entities.
    assert examples[1].labels == ["B-PER", "B-PER"]
    assert examples[0].source == f"{path}:2"
    assert stats.sentences == 2 and stats.tokens == 7 and stats.repaired_tags == 0


def test_conll_reader_keeps_space_free_columns_and_counts_repairs(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                    "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n", encoding="utf-8")
    examples, stats = read_examples(path)
    assert [e.tokens for e in examples] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    # The I-PER that opens a span is repaired to B-PER and counted.
    assert examples[1].labels == ["B-PER", "I-PER"]
    assert stats.repaired_tags == 1 and stats.skipped_docstart == 1
    assert examples[1].source == f"{path}:6"


def test_jsonl_reader(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"tokens": ["New", "York"], "labels": ["B-LOC", "I-LOC"]}) + "\n", encoding="utf-8")
    examples, _ = read_examples(path)
    assert examples[0].tokens == ["New", "York"] and examples[0].labels == ["B-LOC", "I-LOC"]


@pytest.mark.parametrize("name, content, line, reason", [
    ("a.tsv", "text_a\tlabel\n张\x02三\tB-PER\n", 2, "2 tokens but 1 labels"),
    ("b.tsv", "张\x02三\tB-PER\x02I-PER\textra\n", 1, "expected 2 tab-separated fields"),
    ("c.conll", "张 B-PER\n三\n", 2, "expected a token and a tag"),
    ("d.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n{"tokens": ["a"]\n', 2, "not valid JSON"),
    ("e.jsonl", '{"tokens": ["a"]}\n', 1, '"tokens" and "labels"'),
    ("f.tsv", "张\tX-PER\n", 1, "match none of the schemes"),
    ("g.tsv", "张\tBPER\n", 1, "neither 'O' nor PREFIX-TYPE"),
])
def test_reader_errors_name_file_line_and_reason(tmp_path, name, content, line, reason):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_examples(path)
    assert caught.value.path == str(path)
    assert reason in str(caught.value)
    if line is not None and "schemes" not in reason:
        assert caught.value.line == line
        assert f"{path}:{line}:" in str(caught.value)


def test_reader_errors_for_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.tsv")
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no sentences"):
        read_examples(tmp_path / "empty.tsv")
    (tmp_path / "latin1.tsv").write_bytes("张\tO\n".encode() + "caf\xe9\tO\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        read_examples(tmp_path / "latin1.tsv")
    assert caught.value.line == 2 and "not valid UTF-8" in str(caught.value)
    with pytest.raises(DataError, match="extension"):
        read_examples(tmp_path / "data.xlsx")


def test_label_outside_the_list_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("张\x02三\tB-PER\x02I-PER\n北\tB-MISC\n", encoding="utf-8")
    examples, _ = read_examples(path)
    with pytest.raises(DataError) as caught:
        check_labels(examples, ["B-PER", "I-PER", "O"])
    assert caught.value.line == 2 and "B-MISC" in str(caught.value)
    assert label_list_from(examples) == ["B-MISC", "I-MISC", "B-PER", "I-PER", "O"]


# ---------------------------------------------------------------- alignment


TRICKY_TEXTS = [
    "2022年张三 去北京",  # digits, a space inside the text
    "NASA和nasa在纽约",  # upper- and lower-case Latin letters
    "张三😀去了北京",  # an emoji
    "李四\u3000在\u0007上海。",  # a full-width space and a control character
    "ＡＢＣ张三１２３",  # full-width letters and digits
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_every_character_keeps_its_own_label(tokenizer, text):
    """Each character's label sits on that character's own first piece, whatever precedes it."""
    tokens = list(text)
    labels = ["B-PER" if i % 3 == 0 else "O" for i in range(len(tokens))]
    label2id = {"B-PER": 0, "I-PER": 1, "O": 2}
    aligner = Aligner(tokenizer, max_seq_len=64)
    (window,) = aligner.windows(tokens)
    (input_ids, label_ids), = aligner.training_features(
        type("E", (), {"tokens": tokens, "labels": labels})(), label2id)
    assert len(window.first_positions) == len(tokens)
    for index, (token, position) in enumerate(zip(tokens, window.first_positions)):
        pieces = aligner.pieces(token)
        if not pieces:
            assert position == -1, f"{token!r} has no piece but a position"
            continue
        assert input_ids[position] == pieces[0], f"character {index} {token!r} points at another token"
        assert label_ids[position] == label2id[labels[index]]
    # Only first pieces carry labels; specials and the rest are ignored.
    labelled = {p for p in window.first_positions if p >= 0}
    assert all(label_ids[i] == IGNORE_INDEX for i in range(len(label_ids)) if i not in labelled)
    assert input_ids[0] == tokenizer.cls_token_id and input_ids[-1] == tokenizer.sep_token_id


def test_spaces_and_control_characters_have_no_piece_but_keep_later_labels(tokenizer):
    aligner = Aligner(tokenizer, max_seq_len=64)
    assert aligner.pieces(" ") == () and aligner.pieces("\u3000") == () and aligner.pieces("\u0007") == ()
    # Upper-case letters are lower-cased by this tokenizer, so they are not [UNK].
    assert aligner.pieces("N") == aligner.pieces("n") != (tokenizer.unk_token_id,)
    tokens = list("2022年 张三")
    (window,) = aligner.windows(tokens)
    assert window.first_positions == [1, 2, 3, 4, 5, -1, 6, 7]


def test_plan_windows_cover_everything_within_budget():
    counts = [1, 0, 2, 1, 1, 3, 1, 0, 1, 2, 1, 1]
    for budget in (3, 4, 7):
        for overlap in (0, 1, 2):
            windows = plan_windows(counts, budget, overlap)
            assert windows[0][0] == 0 and windows[-1][1] == len(counts)
            for (start, end), (next_start, _) in zip(windows, windows[1:]):
                assert start < next_start <= end  # progress, and no gap
                if overlap == 0:
                    assert next_start == end
            assert all(sum(counts[s:e]) <= budget for s, e in windows)
    assert plan_windows([], 5) == [(0, 0)]


def test_long_sentence_is_split_into_training_windows_not_truncated(tokenizer):
    tokens = list("张三去北京工作了") * 10
    example = type("E", (), {"tokens": tokens, "labels": ["O"] * len(tokens)})()
    features, stats = build_training_features([example], Aligner(tokenizer, max_seq_len=20), ["B-PER", "I-PER", "O"])
    assert stats.split_examples == 1 and stats.windows == len(features) == 5
    assert sum(int((f[1] != IGNORE_INDEX).sum()) for f in features) == len(tokens)
    assert all(len(f[0]) <= 20 for f in features)


def test_collator_pads_to_the_longest_in_batch_not_max_seq_len():
    collate = TrainingCollator(pad_id=0)
    input_ids, label_ids = collate([(np.array([2, 5, 3]), np.array([-100, 1, -100])),
                                    (np.array([2, 5, 6, 7, 3]), np.array([-100, 1, 2, 2, -100]))])
    assert input_ids.shape == (2, 5) and label_ids.shape == (2, 5)
    assert input_ids[0].tolist() == [2, 5, 3, 0, 0] and label_ids[0].tolist() == [-100, 1, -100, -100, -100]


def test_tokens_without_pieces_inside_an_entity_join_it():
    labels = ["B-PER", "O", "I-PER", "O", "O", "B-LOC"]
    has_pieces = [True, False, True, True, False, True]
    assert fill_tokens_without_pieces(labels, has_pieces) == ["B-PER", "I-PER", "I-PER", "O", "O", "B-LOC"]
    assert fill_tokens_without_pieces(["O", "B-LOC"], [False, True]) == ["O", "B-LOC"]


def test_length_grouped_sampler_shards_cover_every_window_with_little_padding(monkeypatch):
    from pipeline.sampling import LengthGroupedBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 100, size=1001)
    dataset = list(range(len(lengths)))
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
        monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
        sampler = LengthGroupedBatchSampler(dataset, lengths, batch_size=8, seed=5)
        assert (sampler.nranks, sampler.local_rank) == (2, rank)
        sampler.set_epoch(3)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == 63
    # Same number of batches on each rank; together they hold every window, a few (<16) twice.
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(dataset) and len(seen) - len(dataset) < 16
    # Batches at the same step have similar lengths: padding far below random batching's.
    def padding(batches):
        computed = sum(max(lengths[b]) * len(b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / computed
    assert padding(per_rank[0]) < 0.1
    # A new epoch gives a new order.
    sampler.set_epoch(4)
    assert list(sampler) != per_rank[1]
