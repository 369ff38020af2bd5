"""Raw text to model tokens and back: how ``Predictor`` cuts a text and places its entities.

A checkpoint's ``text_unit`` says what its tokens were in training: every
character (``"char"``, as in MSRA-NER) or every run of non-space (``"word"``,
as in CoNLL). Prediction cuts raw text the same way, then spreads the token
labels back over characters, so entities are character offsets into the text
the user gave, whatever the unit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .labels import OUTSIDE, bio_spans

WORD_PATTERN = re.compile(r"\S+")


@dataclass
class TextUnits:
    """How a raw text was cut into model tokens, with each token's character offsets."""

    tokens: list[str]
    offsets: list[tuple[int, int]]


def split_text(text: str, text_unit: str) -> TextUnits:
    """Cut text into tokens: every character ('char') or every run of non-space ('word')."""
    if text_unit == "char":
        return TextUnits(list(text), [(i, i + 1) for i in range(len(text))])
    matches = list(WORD_PATTERN.finditer(text))
    return TextUnits([m.group() for m in matches], [m.span() for m in matches])


def character_labels(text: str, units: TextUnits, token_labels: list[str]) -> list[str]:
    """Spread token labels over characters: one label per character of ``text``."""
    if len(units.offsets) == len(text) and all(end - start == 1 for start, end in units.offsets):
        return list(token_labels)
    labels = [OUTSIDE] * len(text)
    previous_end, previous_type = 0, None
    for (start, end), label in zip(units.offsets, token_labels):
        entity_type = None if label == OUTSIDE else label[2:]
        # Whitespace between two words of one entity belongs to the entity.
        if label.startswith("I-") and entity_type == previous_type:
            for gap in range(previous_end, start):
                labels[gap] = label
        labels[start] = label
        for inside in range(start + 1, end):
            labels[inside] = OUTSIDE if label == OUTSIDE else f"I-{entity_type}"
        previous_end, previous_type = end, entity_type
    return labels


def entities_of(text: str, labels: list[str]) -> list[dict]:
    """Entities as ``{"type", "start", "end", "text"}``; adjacent entities stay separate."""
    return [{"type": t, "start": s, "end": e, "text": text[s:e]} for t, s, e in bio_spans(labels)]
