"""Training batches: padded to the batch's longest, grouped by length and sharded across ranks."""
from __future__ import annotations

import numpy as np

from pipeline.collate import TrainingCollator


def test_collator_pads_to_the_longest_in_batch_not_max_seq_len():
    collate = TrainingCollator(pad_id=0)
    input_ids, label_ids = collate([(np.array([2, 5, 3]), np.array([-100, 1, -100])),
                                    (np.array([2, 5, 6, 7, 3]), np.array([-100, 1, 2, 2, -100]))])
    assert input_ids.shape == (2, 5) and label_ids.shape == (2, 5)
    assert input_ids[0].tolist() == [2, 5, 3, 0, 0] and label_ids[0].tolist() == [-100, 1, -100, -100, -100]


def test_length_grouped_sampler_shards_cover_every_window_with_little_padding(monkeypatch):
    from pipeline.sampling import LengthGroupedBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 100, size=1001)
    dataset = list(range(len(lengths)))
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
        monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
        sampler = LengthGroupedBatchSampler(dataset, lengths, batch_size=8, seed=5)
        assert (sampler.nranks, sampler.local_rank) == (2, rank)
        sampler.set_epoch(3)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == 63
    # Same number of batches on each rank; together they hold every window, a few (<16) twice.
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(dataset) and len(seen) - len(dataset) < 16
    # Batches at the same step have similar lengths: padding far below random batching's.
    def padding(batches):
        computed = sum(max(lengths[b]) * len(b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / computed
    assert padding(per_rank[0]) < 0.1
    # A new epoch gives a new order.
    sampler.set_epoch(4)
    assert list(sampler) != per_rank[1]
