"""Evaluation over shards: every example counted once, sums equal the single-process count."""
from __future__ import annotations

import pytest

from helpers import assert_matches_seqeval, per_token_model
from pipeline import dist, evaluation
from pipeline.alignment import Aligner
from pipeline.engines import DynamicEngine
from pipeline.labeller import TokenLabeller
from pipeline.labels import MSRA_LABELS
from pipeline.metrics import EntityCounts
from pipeline.readers import read_examples


@pytest.mark.parametrize("count, world", [(0, 2), (1, 2), (7, 2), (24, 2), (10, 3)])
def test_shards_cover_every_example_exactly_once(count, world):
    shards = [dist.shard_indices(count, rank, world) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(count))


def test_two_rank_evaluation_sums_to_the_single_process_counts(tiny_model_dir, tiny_dataset_dir, monkeypatch):
    from paddlenlp.transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tiny_model_dir))
    examples, _ = read_examples(tiny_dataset_dir / "dev.tsv")
    examples = examples[:23]  # odd, so a padding sampler would have to repeat one
    labeller = TokenLabeller(DynamicEngine(per_token_model(len(tokenizer.vocab), len(MSRA_LABELS), seed=3)),
                             Aligner(tokenizer, 32), MSRA_LABELS, batch_size=4)
    whole = evaluation.evaluate(labeller, examples, show_progress=False)

    shard_counts = []
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        shard_counts.append(evaluation.evaluate(labeller, examples, show_progress=False))
    summed = shard_counts[0] + shard_counts[1]
    assert summed == whole
    assert summed.summary()["num_gold"] == sum(
        len([t for t in e.labels if t.startswith("B-")]) for e in examples)
    assert isinstance(whole, EntityCounts) and whole.summary()["num_predicted"] > 0


def test_kept_predictions_are_the_labellers_and_give_seqeval_the_same_metrics(tiny_model_dir, tiny_dataset_dir):
    from paddlenlp.transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tiny_model_dir))
    examples, _ = read_examples(tiny_dataset_dir / "test.tsv")
    # A random per-token model: some entities right, many wrong, so the metrics are far from 0 and 1.
    labeller = TokenLabeller(DynamicEngine(per_token_model(len(tokenizer.vocab), len(MSRA_LABELS), seed=5)),
                             Aligner(tokenizer, 32), MSRA_LABELS, batch_size=4)
    counts, predictions = evaluation.evaluate(labeller, examples, show_progress=False, keep_predictions=True)
    assert predictions == labeller.label([e.tokens for e in examples])  # in the examples' order
    summary, gold = counts.summary(), [e.labels for e in examples]
    assert summary["num_predicted"] > 0
    assert_matches_seqeval(summary, gold, predictions)
