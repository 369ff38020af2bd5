"""Collation: training features into ``[batch, longest]`` int64 arrays, labels padded to be ignored."""
from __future__ import annotations

import numpy as np

from .labels import IGNORE_INDEX

# Hand-written because neither library collator fits: Paddle's default collate_fn stacks arrays of
# one length, which would mean padding every window to max_seq_len up front, and PaddleNLP's
# DataCollatorForTokenClassification pads through tokenizer.pad on dicts of Python lists. Features
# here are already (input_ids, label_ids) int64 arrays, so padding them to the batch's longest
# sequence (short when batches are grouped by length), labels with IGNORE_INDEX so the loss skips
# the padding as it skips special tokens, takes these few lines.


def pad_batch(sequences: list[np.ndarray], pad_value: int) -> np.ndarray:
    """Stack 1-D arrays into ``[batch, longest]``: padding to the batch's longest, not max_seq_len."""
    longest = max(len(s) for s in sequences)
    batch = np.full((len(sequences), longest), pad_value, dtype=np.int64)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return batch


class TrainingCollator:
    """Pads a list of ``(input_ids, label_ids)`` features into two int64 arrays."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        input_ids = pad_batch([f[0] for f in features], self.pad_id)
        label_ids = pad_batch([f[1] for f in features], IGNORE_INDEX)
        return input_ids, label_ids
