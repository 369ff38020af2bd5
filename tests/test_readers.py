"""Readers: the three layouts, tag conversion to strict BIO, their errors, and label lists."""
from __future__ import annotations

import json

import pytest

from pipeline.readers import DataError, check_labels, label_list_from, read_examples


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
    (tmp_path / "folder.tsv").mkdir()
    with pytest.raises(DataError, match="folder.tsv: file is a directory, not a file"):
        read_examples(tmp_path / "folder.tsv")
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
