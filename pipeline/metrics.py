"""Entity-level precision, recall and F1 in two scorings, from counts that add up across ranks.

Each rank counts, per entity type and per scoring, the entities it predicted, the gold entities,
and the predictions that match a gold entity exactly (same sentence, type, start and end). Those
counts are summed across data-parallel ranks (``to_vector`` -> all-reduce -> ``from_vector``) and
only then turned into rates, so the corpus F1 is exact: an average of per-rank or per-batch F1s
is not the corpus F1.

The two scorings differ only in how a tag sequence is read into entities:

- **conlleval-style** (``conll_spans``, the plain keys ``precision``/``recall``/``f1``): an ``I-X``
  after ``O`` or after another type starts an entity, as conlleval, seqeval's default mode and
  PaddleNLP's ChunkEvaluator read it. The published MSRA-NER and CoNLL figures are scored so.
- **strict IOB2** (``pipeline.labels.bio_spans``, the keys ``strict_precision``...): such an ``I-X``
  is not an entity; it is what the predictor returns as entities.

On valid BIO sequences the two agree. ``tests/test_metrics.py`` checks both against seqeval
(default mode, and ``mode="strict", scheme=IOB2``). Summaries written before the conlleval-style
scores existed held the strict figures under the plain keys; ``upgrade_summary`` reads them.

Zero denominators give 0.0, as seqeval does with its default
``zero_division="warn"`` (it warns and returns 0.0): precision is 0.0 with no
predicted entities, recall 0.0 with no gold entities, and F1 0.0 when both
precision and recall are 0.0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.labels import OUTSIDE, bio_spans, split_tag

# Row order of each scoring's count matrix, and so of the flat vector ranks reduce.
_PREDICTED, _GOLD, _CORRECT = 0, 1, 2
# The scorings, in the order of the count planes; each one's summary keys start with its prefix.
SCORINGS = ("conlleval", "strict")
KEY_PREFIXES = {"conlleval": "", "strict": "strict_"}
SCORING_NAMES = {"conlleval": "conlleval-style", "strict": "strict IOB2"}  # for reports
# The corpus scores every summary carries (conlleval-style, then strict IOB2), in the order reports print
# them; `compare_metrics` picks one of them.
SCORE_KEYS = tuple(KEY_PREFIXES[s] + k for s in SCORINGS for k in ("precision", "recall", "f1"))
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


def conll_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) read the conlleval way: an ``I-X`` after ``O``
    or after another type starts an entity (seqeval's default mode, PaddleNLP's ChunkEvaluator)."""
    # seqeval's own reading, imported here rather than at the top: seqeval loads scikit-learn (seconds),
    # which the config and report commands importing this module never need.
    from seqeval.metrics.sequence_labeling import get_entities

    return [(entity_type, start, end + 1) for entity_type, start, end in get_entities(list(tags))]


# How each scoring reads a tag sequence into entities.
SPAN_READERS = {"conlleval": conll_spans, "strict": bio_spans}
# Summary keys that belong to one scoring (and so carry its prefix), overall and per type.
_SCORING_KEYS = ("precision", "recall", "f1", "num_predicted", "num_gold", "num_correct", "support")


def upgrade_summary(summary: dict) -> dict:
    """A summary (or dev record) in today's form. One written before the conlleval-style scores existed has
    no ``strict_f1``: its plain keys held strict IOB2 figures, so they move to the ``strict_`` keys, and
    the conlleval-style ones stay absent (they were never measured)."""
    if "strict_f1" in summary or "f1" not in summary:
        return summary
    prefix = KEY_PREFIXES["strict"]

    def moved(record: dict) -> dict:
        return {prefix + key if key in _SCORING_KEYS else key: value for key, value in record.items()}

    upgraded = moved(summary)
    if "per_type" in upgraded:
        upgraded["per_type"] = {t: moved(values) for t, values in upgraded["per_type"].items()}
    return upgraded


class EntityCounts:
    """Predicted, gold and correct entity counts per scoring and type, in a fixed type order."""

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
        # [scoring, predicted/gold/correct, type]
        self._counts = np.zeros((len(SCORINGS), 3, len(entity_types)), dtype=np.int64)

    # -- counting ---------------------------------------------------------------

    def update(self, gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
        """Add the entities of a batch of gold and predicted BIO sentences, read in both scorings."""
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
            for plane, scoring in enumerate(SCORINGS):
                gold_spans = set(SPAN_READERS[scoring](gold_tags))
                pred_spans = set(SPAN_READERS[scoring](pred_tags))
                for row, spans in (
                    (_GOLD, gold_spans),
                    (_PREDICTED, pred_spans),
                    (_CORRECT, gold_spans & pred_spans),
                ):
                    for entity_type, _, _ in spans:
                        counts[plane, row, self._index[entity_type]] += 1
        self._counts += counts

    def _check_tags(self, tags: Sequence[str], sentence: int, side: str) -> None:
        """Raise ValueError for a tag that is not strict BIO or names an unknown type."""
        for tag in tags:
            # split_tag raises TagError (a ValueError) for tags that are not O or PREFIX-TYPE.
            prefix, entity_type = split_tag(tag)
            # The span readers would read E-/S- tags as BIOES or not at all; seqeval's strict mode rejects
            # them: so do we.
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
        """Predicted entities per type (conlleval-style; ``counts("strict")`` for strict IOB2)."""
        return self.counts()["predicted"]

    @property
    def gold(self) -> dict[str, int]:
        """Gold entities per type (conlleval-style)."""
        return self.counts()["gold"]

    @property
    def correct(self) -> dict[str, int]:
        """Predicted entities that exactly match a gold entity, per type (conlleval-style)."""
        return self.counts()["correct"]

    def counts(self, scoring: str = "conlleval") -> dict[str, dict[str, int]]:
        """``{"predicted": {type: n}, "gold": {...}, "correct": {...}}`` under one scoring."""
        plane = self._counts[SCORINGS.index(scoring)]
        return {name: {t: int(n) for t, n in zip(self.entity_types, plane[row])}
                for name, row in (("predicted", _PREDICTED), ("gold", _GOLD), ("correct", _CORRECT))}

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
        planes = "; ".join(
            f"{scoring} " + ", ".join(f"{t}: pred={p} gold={g} correct={c}"
                                      for t, (p, g, c) in zip(self.entity_types, plane.T.tolist()))
            for scoring, plane in zip(SCORINGS, self._counts)
        )
        return f"EntityCounts({planes})"

    def to_vector(self) -> np.ndarray:
        """Flat int64 counts for an all-reduce sum: per scoring (conlleval, strict), predicted per type,
        then gold, then correct."""
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
                f"for {len(SCORINGS)} scorings of {len(counts.entity_types)} entity types"
            )
        whole = values.astype(np.int64)
        if not np.array_equal(whole, values):
            raise ValueError("count vector holds values that are not whole numbers")
        whole = whole.reshape(counts._counts.shape)
        # A vector laid out for other types, or corrupted in transit, usually breaks these.
        if (whole < 0).any() or (whole[:, _CORRECT] > np.minimum(whole[:, _PREDICTED], whole[:, _GOLD])).any():
            raise ValueError("count vector is inconsistent: negative, or more correct than predicted or gold")
        counts._counts = whole
        return counts

    # -- rates ----------------------------------------------------------------

    def summary(self) -> dict:
        """Micro-averaged precision/recall/F1 with totals, and the same per type with support: the
        conlleval-style figures under the plain keys, the strict IOB2 ones under ``strict_`` keys."""
        summary: dict = {}
        per_type: dict = {t: {} for t in self.entity_types}
        for scoring, plane in zip(SCORINGS, self._counts):
            prefix = KEY_PREFIXES[scoring]
            predicted, gold, correct = (int(n) for n in plane.sum(axis=1))
            precision, recall, f1 = _scores(predicted, gold, correct)
            summary.update({f"{prefix}precision": precision, f"{prefix}recall": recall, f"{prefix}f1": f1,
                            f"{prefix}num_predicted": predicted, f"{prefix}num_gold": gold,
                            f"{prefix}num_correct": correct})
            for t, (p, g, c) in zip(self.entity_types, plane.T.tolist()):
                type_precision, type_recall, type_f1 = _scores(p, g, c)
                per_type[t].update({f"{prefix}precision": type_precision, f"{prefix}recall": type_recall,
                                    f"{prefix}f1": type_f1, f"{prefix}support": g})
        summary["per_type"] = per_type
        return summary
