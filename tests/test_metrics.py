"""EntityCounts against seqeval (default mode for the conlleval-style scores, strict IOB2 for the strict ones),
additivity, reading old summaries, and errors."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2, Entities, Tokens

from pipeline.labels import bio_spans
from pipeline.metrics import SCORE_KEYS, EntityCounts, conll_spans, upgrade_summary

# seqeval warns (and returns 0.0) on zero denominators, and its macro average warns on a
# corpus with no entities at all; those cases are tested on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning"),
    pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning"),
]

TYPES = ["PER", "LOC", "ORG"]
ALL_TAGS = ["O"] + [f"{p}-{t}" for t in TYPES for p in ("B", "I")]


def _random_sentence(rng: random.Random, length: int) -> list[str]:
    """Tags drawn freely, so I- after O, I-X after B-Y and B-X B-X all occur."""
    return [rng.choice(ALL_TAGS) if rng.random() < 0.6 else "O" for _ in range(length)]


def _perturbed(rng: random.Random, tags: list[str], rate: float) -> list[str]:
    """A prediction that keeps most gold tags, so many entities match exactly."""
    return [rng.choice(ALL_TAGS) if rng.random() < rate else tag for tag in tags]


def _random_corpus(seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Seeded gold and pred corpora of varied size, length and error rate."""
    rng = random.Random(seed)
    rate = rng.choice([0.0, 0.05, 0.2, 0.5, 1.0])
    gold = [_random_sentence(rng, rng.randint(0, 15)) for _ in range(rng.randint(1, 40))]
    pred = [_perturbed(rng, sentence, rate) for sentence in gold]
    return gold, pred


def _counts(gold, pred, types=TYPES) -> EntityCounts:
    counts = EntityCounts(types)
    counts.update(gold, pred)
    return counts


# Our key prefix for each seqeval mode: its default mode is conlleval's reading.
SEQEVAL_MODES = {"": {}, "strict_": {"mode": "strict", "scheme": IOB2}}


def _assert_matches_seqeval(gold, pred) -> None:
    summary = _counts(gold, pred).summary()
    for prefix, mode in SEQEVAL_MODES.items():
        assert summary[prefix + "precision"] == precision_score(gold, pred, **mode)
        assert summary[prefix + "recall"] == recall_score(gold, pred, **mode)
        assert summary[prefix + "f1"] == f1_score(gold, pred, **mode)

        report = classification_report(gold, pred, output_dict=True, **mode)
        for entity_type, ours in summary["per_type"].items():
            ours = {key: ours[prefix + key] for key in ("precision", "recall", "f1", "support")}
            if entity_type not in report:
                # seqeval lists only types seen in gold or pred; ours are then all zero.
                assert ours == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
                continue
            theirs = report[entity_type]
            assert ours["precision"] == theirs["precision"]
            assert ours["recall"] == theirs["recall"]
            assert ours["f1"] == theirs["f1-score"]
            assert ours["support"] == theirs["support"]
        assert set(report) - {"micro avg", "macro avg", "weighted avg"} <= set(TYPES)

    gold_entities = Entities(gold, IOB2)
    pred_entities = Entities(pred, IOB2)
    assert summary["strict_num_gold"] == sum(map(len, gold_entities.entities))
    assert summary["strict_num_predicted"] == sum(map(len, pred_entities.entities))
    assert summary["strict_num_correct"] == sum(
        len(gold_entities.filter(t) & pred_entities.filter(t)) for t in TYPES
    )
    # seqeval's default mode reads the corpus as one sequence with an O between sentences.
    gold_chunks, pred_chunks = set(get_entities(gold)), set(get_entities(pred))
    assert summary["num_gold"] == len(gold_chunks)
    assert summary["num_predicted"] == len(pred_chunks)
    assert summary["num_correct"] == len(gold_chunks & pred_chunks)


@pytest.mark.parametrize("seed", range(300))
def test_matches_seqeval_default_and_strict_modes_on_random_corpora(seed):
    gold, pred = _random_corpus(seed)
    _assert_matches_seqeval(gold, pred)


@pytest.mark.parametrize(
    "gold, pred",
    [
        ([["O", "O"]], [["O", "O"]]),  # no entities anywhere: everything 0.0
        ([["B-PER", "I-PER"]], [["O", "O"]]),  # nothing predicted: precision 0.0
        ([["O", "O"]], [["B-LOC", "O"]]),  # no gold: recall 0.0
        ([["I-PER", "I-PER"]], [["B-PER", "I-PER"]]),  # gold is ill-formed: no gold entity
        ([["B-PER", "B-PER"]], [["B-PER", "I-PER"]]),  # adjacent B-X B-X are two entities
        ([["B-PER", "I-LOC"]], [["B-PER", "O"]]),  # I-LOC after B-PER ends PER; starts LOC only conlleval-style
        ([["B-PER", "I-PER"]], [["I-PER", "I-PER"]]),  # I- after O: a correct entity conlleval-style only
        ([["O", "B-LOC", "I-LOC"]], [["I-LOC", "I-ORG", "I-ORG"]]),  # I-ORG after I-LOC starts an ORG
        ([[]], [[]]),
    ],
)
def test_matches_seqeval_on_edge_cases(gold, pred):
    _assert_matches_seqeval(gold, pred)


def test_hand_counted_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]
    counts = _counts(gold, pred)
    assert counts.predicted == {"PER": 1, "LOC": 0, "ORG": 2}
    assert counts.gold == {"PER": 1, "LOC": 1, "ORG": 1}
    assert counts.correct == {"PER": 1, "LOC": 0, "ORG": 0}
    summary = counts.summary()
    assert (summary["num_predicted"], summary["num_gold"], summary["num_correct"]) == (3, 3, 1)
    assert summary["precision"] == pytest.approx(1 / 3)
    assert summary["recall"] == pytest.approx(1 / 3)
    assert summary["f1"] == pytest.approx(1 / 3)
    both = lambda p, r, f, support: {"precision": p, "recall": r, "f1": f, "support": support,  # noqa: E731
                                     "strict_precision": p, "strict_recall": r, "strict_f1": f,
                                     "strict_support": support}
    # Valid BIO on both sides: the two scorings agree.
    assert summary["per_type"]["PER"] == both(1.0, 1.0, 1.0, 1)
    assert summary["per_type"]["LOC"] == both(0.0, 0.0, 0.0, 1)
    assert counts.counts("strict") == counts.counts("conlleval")


def test_hand_counted_invalid_predictions_differ_between_the_scorings():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["O", "B-ORG", "I-ORG"]]
    # I-PER after O, I-LOC after B-PER, I-ORG after I-LOC (a second, wrong-typed half).
    pred = [["I-PER", "I-PER", "O", "B-PER", "I-LOC"], ["O", "I-LOC", "I-ORG"]]
    counts = _counts(gold, pred)
    # conlleval-style: PER[0,2) correct, PER[3,4), LOC[4,5), LOC[1,2), ORG[2,3).
    assert counts.counts("conlleval") == {"predicted": {"PER": 2, "LOC": 2, "ORG": 1},
                                          "gold": {"PER": 1, "LOC": 1, "ORG": 1},
                                          "correct": {"PER": 1, "LOC": 0, "ORG": 0}}
    # strict: only PER[3,4) starts with B-; no I- opens an entity.
    assert counts.counts("strict") == {"predicted": {"PER": 1, "LOC": 0, "ORG": 0},
                                       "gold": {"PER": 1, "LOC": 1, "ORG": 1},
                                       "correct": {"PER": 0, "LOC": 0, "ORG": 0}}
    summary = counts.summary()
    assert (summary["precision"], summary["recall"]) == (1 / 5, 1 / 3)
    assert (summary["strict_precision"], summary["strict_recall"], summary["strict_f1"]) == (0.0, 0.0, 0.0)


def test_conll_spans_read_stray_inside_tags_as_entities_end_exclusive():
    assert conll_spans(["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]) == [
        ("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4), ("LOC", 5, 6)]
    assert bio_spans(["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]) == [("PER", 2, 3)]
    assert conll_spans([]) == []


def test_upgrade_summary_reads_old_plain_keys_as_strict_and_leaves_new_ones():
    old = {"step": 40, "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "num_predicted": 2, "num_gold": 4,
           "num_correct": 1, "per_type": {"PER": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4}}}
    assert upgrade_summary(old) == {
        "step": 40, "strict_precision": 0.5, "strict_recall": 0.25, "strict_f1": 1 / 3, "strict_num_predicted": 2,
        "strict_num_gold": 4, "strict_num_correct": 1,
        "per_type": {"PER": {"strict_precision": 0.5, "strict_recall": 0.25, "strict_f1": 1 / 3,
                             "strict_support": 4}}}
    new = _counts([["B-PER", "I-PER"]], [["I-PER", "I-PER"]]).summary()
    assert upgrade_summary(new) is new
    assert set(SCORE_KEYS) <= set(new) and (new["f1"], new["strict_f1"]) == (1.0, 0.0)


# -- bio_spans is seqeval's strict IOB2 -------------------------------------------


def _seqeval_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    return sorted((e.tag, e.start, e.end) for e in Tokens(tags, IOB2).entities)


def test_bio_spans_equals_seqeval_on_every_short_sequence():
    # Two types are enough for every ill-formed pattern (I- after O, I-X after B-Y, B-X B-X).
    alphabet = ["O", "B-A", "I-A", "B-B", "I-B"]
    for length in range(7):
        for tags in itertools.product(alphabet, repeat=length):
            assert sorted(bio_spans(list(tags))) == _seqeval_spans(list(tags)), tags


def test_bio_spans_equals_seqeval_on_random_long_sequences():
    rng = random.Random(1234)
    for _ in range(3000):
        tags = _random_sentence(rng, rng.randint(0, 40))
        assert sorted(bio_spans(tags)) == _seqeval_spans(tags), tags


# -- additivity ---------------------------------------------------------------------


def _random_shards(rng: random.Random, n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) pieces covering range(n); some may be empty."""
    cuts = sorted(rng.randint(0, n) for _ in range(shards - 1))
    bounds = [0] + cuts + [n]
    return list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(30))
def test_counts_over_shards_sum_to_corpus_counts(seed):
    gold, pred = _random_corpus(seed)
    whole = _counts(gold, pred)
    rng = random.Random(seed)
    pieces = [
        _counts(gold[a:b], pred[a:b]) for a, b in _random_shards(rng, len(gold), rng.randint(1, 6))
    ]

    total = EntityCounts(TYPES)
    for piece in pieces:
        total += piece
    assert total == whole
    assert sum(pieces, EntityCounts(TYPES)) == whole
    assert total.summary() == whole.summary()

    # Updating one object batch by batch is the same as counting once.
    incremental = EntityCounts(TYPES)
    for a, b in _random_shards(rng, len(gold), 4):
        incremental.update(gold[a:b], pred[a:b])
    assert incremental == whole

    # What an all-reduce does: sum the ranks' vectors element-wise.
    reduced = np.sum([piece.to_vector() for piece in pieces], axis=0)
    assert EntityCounts.from_vector(TYPES, reduced) == whole


def test_rank_shards_interleaved_like_a_distributed_sampler():
    gold, pred = _random_corpus(7)
    world_size = 3
    ranks = [_counts(gold[r::world_size], pred[r::world_size]) for r in range(world_size)]
    assert ranks[0] + ranks[1] + ranks[2] == _counts(gold, pred)


def test_add_returns_new_object_and_iadd_updates_in_place():
    a = _counts([["B-PER"]], [["B-PER"]])
    b = _counts([["B-LOC"]], [["O"]])
    before = a.to_vector()
    total = a + b
    assert total is not a and np.array_equal(a.to_vector(), before)
    same = a
    a += b
    assert a is same and a == total


def test_vector_round_trip():
    gold, pred = _random_corpus(3)
    counts = _counts(gold, pred)
    vector = counts.to_vector()
    assert vector.dtype == np.int64 and vector.shape == (2 * 3 * len(TYPES),)
    assert EntityCounts.from_vector(TYPES, vector) == counts
    # Layout: per scoring (conlleval, then strict), predicted per type, then gold, then correct.
    assert vector.tolist() == [n for scoring in ("conlleval", "strict")
                               for row in counts.counts(scoring).values() for n in row.values()]
    # A float vector of whole numbers (e.g. from a float all-reduce) is accepted.
    assert EntityCounts.from_vector(TYPES, vector.astype(np.float64)) == counts
    # The returned vector is a copy: changing it does not change the counts.
    vector[:] = 0
    assert counts.to_vector().sum() > 0


def test_from_vector_rejects_bad_vectors():
    with pytest.raises(ValueError, match="shape"):
        EntityCounts.from_vector(TYPES, np.zeros(9, dtype=np.int64))  # one scoring's worth
    with pytest.raises(ValueError, match="whole numbers"):
        EntityCounts.from_vector(TYPES, np.full(18, 0.5))
    with pytest.raises(ValueError, match="inconsistent"):
        EntityCounts.from_vector(TYPES, np.array([0] * 6 + [1] + [0] * 11))  # correct without predicted
    with pytest.raises(ValueError, match="inconsistent"):
        EntityCounts.from_vector(TYPES, np.array([0] * 15 + [1, 0, 0]))  # the same in the strict plane
    with pytest.raises(ValueError, match="inconsistent"):
        EntityCounts.from_vector(TYPES, np.array([-1] + [0] * 17))


def test_adding_counts_over_other_types_raises():
    with pytest.raises(ValueError, match="cannot add counts over types"):
        EntityCounts(["PER", "LOC"]) + EntityCounts(["LOC", "PER"])
    counts = EntityCounts(TYPES)
    with pytest.raises(ValueError, match="cannot add counts over types"):
        counts += EntityCounts(["PER"])
    with pytest.raises(TypeError):
        counts + 1


# -- errors -------------------------------------------------------------------------


def test_length_mismatch_names_the_sentence():
    counts = EntityCounts(TYPES)
    with pytest.raises(ValueError, match=r"sentence 1: gold has 3 tags but pred has 2"):
        counts.update([["O"], ["B-PER", "I-PER", "O"]], [["O"], ["B-PER", "I-PER"]])
    with pytest.raises(ValueError, match=r"gold has 2 sentences but pred has 1"):
        counts.update([["O"], ["O"]], [["O"]])


def test_unknown_type_names_the_type():
    counts = EntityCounts(TYPES)
    with pytest.raises(ValueError, match=r"sentence 0: pred tag 'B-MISC' has entity type 'MISC'"):
        counts.update([["O", "B-PER"]], [["B-MISC", "B-PER"]])
    # Also when the tag forms no entity (a stray I-), since it means the label maps differ.
    with pytest.raises(ValueError, match=r"'GPE'"):
        counts.update([["I-GPE"]], [["O"]])


def test_non_bio_tags_raise():
    counts = EntityCounts(TYPES)
    with pytest.raises(ValueError, match=r"not strict BIO"):
        counts.update([["B-PER", "E-PER"]], [["B-PER", "I-PER"]])
    with pytest.raises(ValueError, match=r"PER"):
        counts.update([["PER"]], [["O"]])


def test_failed_update_leaves_counts_unchanged():
    counts = _counts([["B-PER"]], [["B-PER"]])
    before = counts.to_vector()
    with pytest.raises(ValueError):
        # The first sentence is fine; the second is not, so nothing may be counted.
        counts.update([["B-LOC"], ["B-PER", "O"]], [["B-LOC"], ["B-PER"]])
    assert np.array_equal(counts.to_vector(), before)


def test_bad_type_lists_raise():
    with pytest.raises(ValueError, match="more than once"):
        EntityCounts(["PER", "LOC", "PER"])
    with pytest.raises(ValueError, match="non-empty"):
        EntityCounts(["PER", ""])
