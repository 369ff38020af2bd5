"""Alignment: every character keeps its own label, windows cover every token, tokens without pieces."""
from __future__ import annotations

import pytest

from pipeline.alignment import Aligner, build_training_features, fill_tokens_without_pieces, plan_windows
from pipeline.labels import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from paddlenlp.transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(tiny_model_dir))


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


def test_tokens_without_pieces_inside_an_entity_join_it():
    labels = ["B-PER", "O", "I-PER", "O", "O", "B-LOC"]
    has_pieces = [True, False, True, True, False, True]
    assert fill_tokens_without_pieces(labels, has_pieces) == ["B-PER", "I-PER", "I-PER", "O", "O", "B-LOC"]
    assert fill_tokens_without_pieces(["O", "B-LOC"], [False, True]) == ["O", "B-LOC"]
