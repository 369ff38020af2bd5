"""Entity-level precision, recall and F1 from counts that add up across ranks.

Each rank counts, per entity type, the entities it predicted, the gold
entities, and the predictions that match a gold entity exactly (same
sentence, type, start and end). Those counts are summed across data-parallel
ranks (``to_vector`` -> all-reduce -> ``from_vector``) and only then turned
into rates, so the corpus F1 is exact: an average of per-rank or per-batch F1s
is not the corpus F1.

Entities are read in strict IOB2 by ``pipeline.labels.bio_spans``, the same
function prediction uses: an ``I-X`` that does not continue an ``X`` span is
not an entity. ``tests/test_metrics.py`` checks that the results equal
seqeval's ``mode="strict", scheme=IOB2`` metrics.

Zero denominators give 0.0, as seqeval does with its default
``zero_division="warn"`` (it warns and returns 0.0): precision is 0.0 with no
predicted entities, recall 0.0 with no gold entities, and F1 0.0 when both
precision and recall are 0.0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.labels import OUTSIDE, bio_spans, split_tag

# Row order of the count matrix, and so of the flat vector ranks reduce.
_PREDICTED, _GOLD, _CORRECT = 0, 1, 2
# The three corpus scores every summary carries, in the order reports print them.
SCORE_KEYS = ("precision", "recall", "f1")
_BIO_PREFIXES = ("B", "I", OUTSIDE)


def _ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, or 0.0 when the denominator is 0 (seqeval's default)."""
    return numerator / denominator if denominator else 0.0


def _scores(predicted: int, gold: int, correct: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts, with seqeval's zero-division results."""
    precision = _ratio(correct, predicted)
    recall = _ratio(correct, gold)
    # Same expression and operation order as seqeval, so the floats are identical.
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class EntityCounts:
    """Predicted, gold and correct entity counts per type, in a fixed type order."""

    def __init__(self, entity_types: Sequence[str]):
        """Zero counts for ``entity_types``; the order fixes the layout of ``to_vector``."""
        entity_types = list(entity_types)
        if any(not isinstance(t, str) or not t for t in entity_types):
            raise ValueError(f"entity types must be non-empty strings, got {entity_types!r}")
        duplicates = sorted({t for t in entity_types if entity_types.count(t) > 1})
        if duplicates:
            raise ValueError(f"entity types listed more than once: {duplicates}")
        self.entity_types: list[str] = entity_types
        self._index = {t: i for i, t in enumerate(entity_types)}
        self._counts = np.zeros((3, len(entity_types)), dtype=np.int64)

    # -- counting ---------------------------------------------------------------

    def update(self, gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
        """Add the entities of a batch of gold and predicted strict-BIO sentences."""
        if len(gold) != len(pred):
            raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
        # Check every sentence before counting any, so a bad batch leaves the counts untouched.
        for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
            if len(gold_tags) != len(pred_tags):
                raise ValueError(
                    f"sentence {i}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}"
                )
            self._check_tags(gold_tags, i, "gold")
            self._check_tags(pred_tags, i, "pred")
        counts = np.zeros_like(self._counts)
        for gold_tags, pred_tags in zip(gold, pred):
            gold_spans = set(bio_spans(gold_tags))
            pred_spans = set(bio_spans(pred_tags))
            for row, spans in (
                (_GOLD, gold_spans),
                (_PREDICTED, pred_spans),
                (_CORRECT, gold_spans & pred_spans),
            ):
                for entity_type, _, _ in spans:
                    counts[row, self._index[entity_type]] += 1
        self._counts += counts

    def _check_tags(self, tags: Sequence[str], sentence: int, side: str) -> None:
        """Raise ValueError for a tag that is not strict BIO or names an unknown type."""
        for tag in tags:
            # split_tag raises TagError (a ValueError) for tags that are not O or PREFIX-TYPE.
            prefix, entity_type = split_tag(tag)
            # bio_spans would read E-/S- tags as "not an entity"; seqeval rejects them: so do we.
            if prefix not in _BIO_PREFIXES:
                raise ValueError(f"sentence {sentence}: {side} tag {tag!r} is not strict BIO (B-, I-, O)")
            if entity_type is not None and entity_type not in self._index:
                raise ValueError(
                    f"sentence {sentence}: {side} tag {tag!r} has entity type {entity_type!r}, "
                    f"not one of {self.entity_types}"
                )

    # -- per-type counts --------------------------------------------------------

    @property
    def predicted(self) -> dict[str, int]:
        """Predicted entities per type."""
        return self._row(_PREDICTED)

    @property
    def gold(self) -> dict[str, int]:
        """Gold entities per type."""
        return self._row(_GOLD)

    @property
    def correct(self) -> dict[str, int]:
        """Predicted entities that exactly match a gold entity, per type."""
        return self._row(_CORRECT)

    def _row(self, row: int) -> dict[str, int]:
        """One row of the count matrix as ``{type: count}``."""
        return {t: int(n) for t, n in zip(self.entity_types, self._counts[row])}

    # -- summing across shards and ranks ------------------------------------------

    def _check_same_types(self, other: object) -> "EntityCounts":
        """``other`` if it counts the same types in the same order, else raise."""
        if not isinstance(other, EntityCounts):
            raise TypeError(f"cannot add {type(other).__name__} to EntityCounts")
        # Same order too: summed vectors only line up if every column means the same type.
        if other.entity_types != self.entity_types:
            raise ValueError(
                f"cannot add counts over types {other.entity_types} to counts over {self.entity_types}"
            )
        return other

    def __add__(self, other: "EntityCounts") -> "EntityCounts":
        """Counts of two disjoint sets of sentences together."""
        total = EntityCounts(self.entity_types)
        total._counts = self._counts + self._check_same_types(other)._counts
        return total

    def __iadd__(self, other: "EntityCounts") -> "EntityCounts":
        """Add ``other``'s counts into these."""
        self._counts += self._check_same_types(other)._counts
        return self

    def __eq__(self, other: object) -> bool:
        """Same types in the same order with the same counts."""
        if not isinstance(other, EntityCounts):
            return NotImplemented
        return self.entity_types == other.entity_types and np.array_equal(self._counts, other._counts)

    def __repr__(self) -> str:
        """Counts per type, for test failures and logs."""
        per_type = ", ".join(
            f"{t}: pred={p} gold={g} correct={c}"
            for t, (p, g, c) in zip(self.entity_types, self._counts.T.tolist())
        )
        return f"EntityCounts({per_type})"

    def to_vector(self) -> np.ndarray:
        """Flat int64 counts (predicted per type, then gold, then correct) for an all-reduce sum."""
        return self._counts.reshape(-1).copy()

    @classmethod
    def from_vector(cls, entity_types: Sequence[str], vector) -> "EntityCounts":
        """Counts from a (possibly all-reduced) ``to_vector`` output over the same types."""
        counts = cls(entity_types)
        values = np.asarray(vector)
        expected = counts._counts.size
        if values.shape != (expected,):
            raise ValueError(
                f"count vector has shape {values.shape}, expected ({expected},) "
                f"for {len(counts.entity_types)} entity types"
            )
        whole = values.astype(np.int64)
        if not np.array_equal(whole, values):
            raise ValueError("count vector holds values that are not whole numbers")
        whole = whole.reshape(counts._counts.shape)
        # A vector laid out for other types, or corrupted in transit, usually breaks these.
        if (whole < 0).any() or (whole[_CORRECT] > np.minimum(whole[_PREDICTED], whole[_GOLD])).any():
            raise ValueError("count vector is inconsistent: negative, or more correct than predicted or gold")
        counts._counts = whole
        return counts

    # -- rates ----------------------------------------------------------------

    def summary(self) -> dict:
        """Micro-averaged precision/recall/F1 with totals, and the same per type with support."""
        predicted, gold, correct = (int(n) for n in self._counts.sum(axis=1))
        precision, recall, f1 = _scores(predicted, gold, correct)
        per_type = {}
        for t, (p, g, c) in zip(self.entity_types, self._counts.T.tolist()):
            type_precision, type_recall, type_f1 = _scores(p, g, c)
            per_type[t] = {
                "precision": type_precision,
                "recall": type_recall,
                "f1": type_f1,
                "support": g,
            }
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "num_predicted": predicted,
            "num_gold": gold,
            "num_correct": correct,
            "per_type": per_type,
        }
