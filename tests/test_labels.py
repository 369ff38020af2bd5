"""Tag-scheme conversion to strict BIO and entity spans."""
from __future__ import annotations

import pytest

from pipeline.labels import MSRA_LABELS, TagError, bio_labels_for_types, bio_spans, detect_scheme, entity_types, to_bio


def test_bmes_to_bio():
    tags = "B-PER M-PER E-PER O S-LOC B-ORG E-ORG".split()
    bio, stats = to_bio(tags, "bmes")
    assert bio == "B-PER I-PER I-PER O B-LOC B-ORG I-ORG".split()
    assert stats.opened_span_repaired == 0


def test_invalid_bmes_openers_become_b_and_are_counted():
    # The measured MSRA cases: M after O, E after O; plus M after another type and E after E.
    tags = "O M-LOC E-LOC O E-PER B-PER E-PER E-PER S-ORG M-LOC".split()
    bio, stats = to_bio(tags, "bmes")
    assert bio == "O B-LOC I-LOC O B-PER B-PER I-PER B-PER B-ORG B-LOC".split()
    assert stats.opened_span_repaired == 4


def test_bioes_and_bio_repairs():
    assert to_bio("B-X I-X E-X S-X".split(), "bioes")[0] == "B-X I-X I-X B-X".split()
    bio, stats = to_bio("O I-X I-X B-Y I-X".split(), "bio")
    assert bio == "O B-X I-X B-Y B-X".split() and stats.opened_span_repaired == 2


def test_bad_tags_and_schemes():
    with pytest.raises(TagError):
        to_bio(["M-X"], "bio")
    with pytest.raises(TagError):
        to_bio(["O"], "iob9")
    assert detect_scheme("B-X I-X O".split()) == "bio"
    assert detect_scheme("B-X E-X S-Y".split()) == "bioes"
    assert detect_scheme("B-X M-X E-X".split()) == "bmes"
    with pytest.raises(TagError):
        detect_scheme("B-X I-X M-X".split())


def test_spans_keep_adjacent_entities_apart_and_skip_orphans():
    assert bio_spans("B-PER I-PER B-PER O I-LOC B-LOC I-LOC".split()) == [
        ("PER", 0, 2), ("PER", 2, 3), ("LOC", 5, 7)]
    assert bio_spans("B-PER I-LOC".split()) == [("PER", 0, 1)]


def test_label_lists():
    assert bio_labels_for_types(["PER", "ORG", "LOC"]) == MSRA_LABELS
    assert entity_types(MSRA_LABELS) == ["PER", "ORG", "LOC"]
