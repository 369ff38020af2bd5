"""Tag schemes: conversion of BIO / BIOES / BMES tags to strict BIO, and spans.

Everything downstream (training, metrics, prediction) works in strict BIO
(IOB2): an entity starts with ``B-X`` and continues with ``I-X``.
"""
from __future__ import annotations

from dataclasses import dataclass

OUTSIDE = "O"
IGNORE_INDEX = -100  # label id that the loss skips: special tokens, later pieces of a word, padding

# PaddleHub's label list for MSRA-NER, in its order.
MSRA_LABELS = ["B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "O"]

# What each prefix means in each scheme: begin, inside, end, single.
_PREFIX_ROLES = {
    "bio": {"B": "begin", "I": "inside"},
    "bioes": {"B": "begin", "I": "inside", "E": "end", "S": "single"},
    "bmes": {"B": "begin", "M": "inside", "E": "end", "S": "single"},
}
SCHEMES = tuple(_PREFIX_ROLES)


class TagError(ValueError):
    """A tag that no scheme can read (bad prefix or missing type)."""


def split_tag(tag: str) -> tuple[str, str | None]:
    """Split ``B-PER`` into ``("B", "PER")``; ``O`` into ``("O", None)``."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    prefix, sep, entity_type = tag.partition("-")
    if not sep or not entity_type or not prefix:
        raise TagError(f"tag {tag!r} is neither 'O' nor PREFIX-TYPE")
    return prefix, entity_type


def detect_scheme(tags) -> str:
    """Smallest scheme whose prefixes cover every tag seen (bio < bioes < bmes)."""
    return scheme_for_prefixes(split_tag(t)[0] for t in tags)


def scheme_for_prefixes(prefixes) -> str:
    """Smallest scheme that has every tag prefix given (``O`` is in all of them)."""
    prefixes = set(prefixes) - {OUTSIDE}
    if prefixes <= {"B", "I"}:
        return "bio"
    if prefixes <= {"B", "I", "E", "S"}:
        return "bioes"
    if prefixes <= {"B", "M", "E", "S"}:
        return "bmes"
    raise TagError(f"tag prefixes {sorted(prefixes)} match none of the schemes {SCHEMES}")


@dataclass
class ConversionStats:
    """How many tags a conversion had to repair, by the rule it applied."""

    # An I-/M-/E- tag that opens a span (after O, or after another type) becomes B-.
    opened_span_repaired: int = 0

    def __add__(self, other: "ConversionStats") -> "ConversionStats":
        return ConversionStats(self.opened_span_repaired + other.opened_span_repaired)


def to_bio(tags: list[str], scheme: str) -> tuple[list[str], ConversionStats]:
    """Convert one sentence's tags from ``scheme`` to strict BIO.

    Rule for invalid sequences (stated, counted, never silent): a tag that
    continues a span (I-, M-, E-) but follows ``O``, the end of a span, or a
    tag of another type opens a new span and becomes ``B-``.
    """
    if scheme not in _PREFIX_ROLES:
        raise TagError(f"unknown tag scheme {scheme!r}; expected one of {SCHEMES}")
    roles = _PREFIX_ROLES[scheme]
    bio: list[str] = []
    stats = ConversionStats()
    open_type: str | None = None  # type of the span that the next tag may continue
    for tag in tags:
        prefix, entity_type = split_tag(tag)
        if prefix == OUTSIDE:
            bio.append(OUTSIDE)
            open_type = None
            continue
        role = roles.get(prefix)
        if role is None:
            raise TagError(f"tag {tag!r} has prefix {prefix!r}, not valid in scheme {scheme!r}")
        if role in ("begin", "single"):
            bio.append(f"B-{entity_type}")
        elif open_type == entity_type:
            bio.append(f"I-{entity_type}")
        else:
            bio.append(f"B-{entity_type}")
            stats.opened_span_repaired += 1
        # After an end or single tag no span is open, so a following I-/E- is repaired.
        open_type = entity_type if role in ("begin", "inside") else None
    return bio, stats


def bio_labels_for_types(entity_types) -> list[str]:
    """The BIO label list for entity types, in PaddleHub's order (B-, I- per type, then O)."""
    labels = []
    for entity_type in entity_types:
        labels += [f"B-{entity_type}", f"I-{entity_type}"]
    return labels + [OUTSIDE]


def entity_types(labels) -> list[str]:
    """Entity types named by a BIO label list, in first-seen order."""
    seen: list[str] = []
    for label in labels:
        _, entity_type = split_tag(label)
        if entity_type is not None and entity_type not in seen:
            seen.append(entity_type)
    return seen


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) of a strict-BIO sequence.

    An ``I-X`` that does not continue an ``X`` span is not an entity (strict
    IOB2, as seqeval's strict mode counts it). Adjacent spans of one type stay
    separate: a ``B-`` always starts a new one.
    """
    spans = []
    start, open_type = None, None
    for i, tag in enumerate(list(tags) + [OUTSIDE]):
        prefix, entity_type = split_tag(tag)
        continues = prefix == "I" and entity_type == open_type
        if open_type is not None and not continues:
            spans.append((open_type, start, i))
            open_type = None
        if prefix == "B":
            start, open_type = i, entity_type
    return spans
