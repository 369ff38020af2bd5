"""Evaluation library: exact corpus-level entity P/R/F1 over a data set split across ranks.

Each rank labels its own strided share of the examples (no padding, so no
example is counted twice), counts predicted, gold and correct entities, and
the counts are summed over ranks before P/R/F1 are computed. The trainer calls
it on dev and test; ``python -m pipeline.evaluate`` (the command line, in
``pipeline/evaluate.py``) calls it on any labelled file.
"""
from __future__ import annotations

import json

from tqdm import tqdm

from . import dist
from .labeller import TokenLabeller
from .labels import entity_types
from .metrics import EntityCounts
from .readers import Example


def evaluate(labeller: TokenLabeller, examples: list[Example], description: str = "eval",
             show_progress: bool = True, keep_predictions: bool = False):
    """Entity counts summed over all ranks; every rank must call this (it ends in a collective).

    With ``keep_predictions`` it returns ``(counts, predictions)``: every example's predicted
    labels in the examples' order, gathered from all ranks (on every rank).
    """
    types = entity_types(labeller.labels)
    counts = EntityCounts(types)
    mine = dist.shard_indices(len(examples))
    # Sorted by length so that each batch pads little; counts do not depend on the order.
    mine.sort(key=lambda i: len(examples[i].tokens))
    chunk_size = labeller.batch_size * 4
    progress = tqdm(total=len(mine), desc=description, unit="sent", leave=False, mininterval=5,
                    disable=not (show_progress and dist.is_main_process()))
    kept = {}
    for begin in range(0, len(mine), chunk_size):
        indices = mine[begin: begin + chunk_size]
        chunk = [examples[i] for i in indices]
        predicted = labeller.label([example.tokens for example in chunk])
        counts.update([example.labels for example in chunk], predicted)
        if keep_predictions:
            kept.update(zip(indices, predicted))
        progress.update(len(chunk))
    progress.close()
    # Every rank reaches this line exactly once, whatever its share's size.
    total = EntityCounts.from_vector(types, dist.all_reduce_sum(counts.to_vector()))
    if not keep_predictions:
        return total
    merged = {}
    for share in dist.all_gather_objects(kept):
        merged.update(share)
    return total, [merged[i] for i in range(len(examples))]


def write_predictions(path, examples: list[Example], predictions: list[list[str]]) -> None:
    """One JSON line per example: where it came from, its tokens, gold and predicted labels."""
    with open(path, "w", encoding="utf-8") as handle:
        for example, predicted in zip(examples, predictions):
            handle.write(json.dumps({"source": example.source, "tokens": example.tokens, "gold": example.labels,
                                     "predicted": predicted}, ensure_ascii=False) + "\n")
