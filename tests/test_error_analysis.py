"""Error analysis: each entity's outcome on hand-made sentences, counts that add up, and the written report."""
from __future__ import annotations

import json
import random

import pytest

from pipeline.error_analysis import (GOLD_OUTCOMES, PREDICTED_OUTCOMES, ErrorAnalysis, analyse, classify,
                                     write_report)
from pipeline.labels import bio_spans
from pipeline.metrics import conll_spans
from pipeline.readers import Example

TYPES = ["PER", "LOC", "ORG"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_each_kind_on_hand_made_spans():
    gold = [("PER", 0, 2), ("LOC", 3, 5), ("ORG", 6, 9), ("PER", 10, 11), ("LOC", 12, 14)]
    predicted = [
        ("PER", 0, 2),   # correct
        ("ORG", 3, 5),   # same span, other type
        ("ORG", 6, 8),   # same type, shorter
        ("LOC", 10, 11),  # same span as gold PER: wrong type (not boundary)
        ("ORG", 13, 15),  # overlaps gold LOC with another type and span
        ("PER", 16, 17),  # overlaps nothing
    ]
    gold_outcomes, predicted_outcomes, mistakes = classify(gold, predicted)
    assert gold_outcomes == {("PER", 0, 2): "correct", ("LOC", 3, 5): "wrong_type", ("ORG", 6, 9): "wrong_boundary",
                             ("PER", 10, 11): "wrong_type", ("LOC", 12, 14): "wrong_type_and_boundary"}
    assert predicted_outcomes == {("PER", 0, 2): "correct", ("ORG", 3, 5): "wrong_type",
                                  ("ORG", 6, 8): "wrong_boundary", ("LOC", 10, 11): "wrong_type",
                                  ("ORG", 13, 15): "wrong_type_and_boundary", ("PER", 16, 17): "spurious"}
    assert sorted(mistakes, key=str) == sorted([
        ("wrong_type", ("LOC", 3, 5), ("ORG", 3, 5)), ("wrong_boundary", ("ORG", 6, 9), ("ORG", 6, 8)),
        ("wrong_type", ("PER", 10, 11), ("LOC", 10, 11)),
        ("wrong_type_and_boundary", ("LOC", 12, 14), ("ORG", 13, 15)), ("spurious", None, ("PER", 16, 17))], key=str)


def test_one_entity_split_in_two_and_a_missed_one():
    # Gold ORG[0,6) predicted as ORG[0,2) + LOC[2,4); gold PER[8,10) not predicted at all.
    gold_outcomes, predicted_outcomes, mistakes = classify([("ORG", 0, 6), ("PER", 8, 10)],
                                                           [("ORG", 0, 2), ("LOC", 2, 4)])
    # The gold entity is in a same-type pair and an other-type pair: same type wins (wrong boundary).
    assert gold_outcomes == {("ORG", 0, 6): "wrong_boundary", ("PER", 8, 10): "missed"}
    assert predicted_outcomes == {("ORG", 0, 2): "wrong_boundary", ("LOC", 2, 4): "wrong_type_and_boundary"}
    assert len(mistakes) == 3 and ("missed", ("PER", 8, 10), None) in mistakes


def test_a_sentence_from_tags_counts_texts_and_reads_stray_inside_tags_conlleval_style():
    tokens = list("美国前商务部长布朗访华")
    gold = ["B-LOC", "I-LOC", "O", "O", "O", "O", "O", "B-PER", "I-PER", "O", "B-LOC"]
    pred = ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "I-PER", "I-PER", "O", "O"]
    analysis = ErrorAnalysis(TYPES)
    analysis.update(tokens, gold, pred, "test.tsv:7")
    report = analysis.report()
    # conlleval-style, the stray I-PER I-PER is 布朗/PER: correct.
    assert report["outcomes"]["predicted"]["total"] == {"correct": 1, "wrong_type": 0, "wrong_boundary": 0,
                                                        "wrong_type_and_boundary": 1, "spurious": 0}
    assert report["outcomes"]["gold"]["total"] == {"correct": 1, "wrong_type": 0, "wrong_boundary": 0,
                                                   "wrong_type_and_boundary": 1, "missed": 1}
    assert report["top_mistakes"][0] == {"kind": "wrong_type_and_boundary", "gold": "美国/LOC",
                                         "predicted": "美国前商务部/ORG", "count": 1, "source": "test.tsv:7",
                                         "sentence": "美国前商务部长布朗访华",
                                         "marked": "【美国前商务部】长布朗访华"}
    assert {(m["kind"], m["gold"], m["predicted"]) for m in report["top_mistakes"][1:]} == {("missed", "华/LOC", None)}
    # Read strict IOB2 instead, the I-PER I-PER is no entity: 布朗 is missed.
    strict = ErrorAnalysis(TYPES, scoring="strict")
    strict.update(tokens, gold, pred)
    assert strict.report()["outcomes"]["gold"]["total"]["missed"] == 2


@pytest.mark.parametrize("scoring, read", [("conlleval", conll_spans), ("strict", bio_spans)])
def test_outcomes_add_up_to_the_predicted_and_gold_totals_on_random_tags(scoring, read):
    rng = random.Random(3)
    tags = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
    examples, predictions = [], []
    for i in range(200):
        gold = [rng.choice(tags) if rng.random() < 0.6 else "O" for _ in range(rng.randint(0, 15))]
        examples.append(Example(list("x" * len(gold)), gold, f"f:{i}"))
        predictions.append([rng.choice(tags) if rng.random() < 0.3 else t for t in gold])
    report = analyse(examples, predictions, TYPES, scoring=scoring).report(top=10**6)
    prefix = "" if scoring == "conlleval" else "strict_"
    scores = report["scores"]
    predicted, gold = report["outcomes"]["predicted"], report["outcomes"]["gold"]
    assert sum(predicted["total"].values()) == scores[prefix + "num_predicted"] > 0
    assert sum(gold["total"].values()) == scores[prefix + "num_gold"] > 0
    assert predicted["total"]["correct"] == gold["total"]["correct"] == scores[prefix + "num_correct"]
    assert predicted["total"]["wrong_type"] == gold["total"]["wrong_type"]  # same span: one to one
    for entity_type in TYPES:
        assert sum(predicted["per_type"][entity_type].values()) == sum(
            1 for p in predictions for span in read(p) if span[0] == entity_type)
    # Every lone entity is one mistake; every missed and spurious one is listed.
    mistakes = {kind: sum(m["count"] for m in report["top_mistakes"] if m["kind"] == kind) for kind in
                ("missed", "spurious")}
    assert mistakes == {"missed": gold["total"]["missed"], "spurious": predicted["total"]["spurious"]}
    assert all(set(predicted["per_type"][t]) == set(PREDICTED_OUTCOMES) for t in TYPES)
    assert all(set(gold["per_type"][t]) == set(GOLD_OUTCOMES) for t in TYPES)


def test_write_report_writes_json_markdown_and_a_png(tmp_path):
    analysis = ErrorAnalysis(TYPES)
    analysis.update(list("张三在北京"), ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"],
                    ["B-PER", "O", "O", "B-ORG", "I-ORG"], "dev.tsv:1")
    paths = write_report(tmp_path / "new" / "report", analysis, "dev.tsv")
    assert [p.name for p in paths] == ["error_analysis.json", "error_analysis.md", "errors_by_type.png"]
    report = json.loads(paths[0].read_text(encoding="utf-8"))
    assert report["top_mistakes"][0]["sentence"] == "张三在北京"
    page = paths[1].read_text(encoding="utf-8")
    assert "| 1 | wrong_type | 北京/LOC | 北京/ORG | 张三在【北京】 (dev.tsv:1) |" in page
    assert "## Scores, strict IOB2" in page and "## Scores, conlleval-style" in page
    assert paths[2].read_bytes().startswith(PNG_SIGNATURE)
