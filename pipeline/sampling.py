"""Training batches: shuffled every epoch, grouped by length, sharded identically across ranks."""
from __future__ import annotations

import numpy as np
from paddle.io import DistributedBatchSampler

# Hand-written because neither library has one: Paddle's DistributedBatchSampler shuffles and shards
# but does not group by length, and PaddleNLP's TrainingArguments only mentions group_by_length in a
# docstring. Grouping is done on the global batch, the same on every rank, so that all ranks run
# batches of similar length at the same step instead of waiting for the one with the longest.


class LengthGroupedBatchSampler(DistributedBatchSampler):
    """Shuffled every epoch, then grouped by length, identically on every rank, then sharded.

    Each epoch: permute all windows with ``seed + epoch``; cut the permutation
    into buckets of ``bucket_batches`` global batches; sort each bucket by
    length; cut it into global batches (``batch_size`` x ranks); shuffle the
    order of the global batches. Each rank takes every n-th window of a global
    batch, so all ranks run batches of similar length at the same step. Like
    ``DistributedBatchSampler``, a few windows are repeated so that every rank
    gets the same number of full batches.
    """

    def __init__(self, dataset, lengths, batch_size: int, seed: int, bucket_batches: int = 50):
        super().__init__(dataset, batch_size=batch_size, shuffle=True, drop_last=False)
        self.lengths = np.asarray(lengths)
        if len(self.lengths) != len(dataset):
            raise ValueError(f"{len(self.lengths)} lengths for {len(dataset)} windows")
        self.seed = seed
        self.global_batch = batch_size * self.nranks
        self.bucket_size = self.global_batch * bucket_batches

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (the same list on every rank)."""
        rng = np.random.default_rng(self.seed + self.epoch)
        count = len(self.lengths)
        order = rng.permutation(count)
        padded = -(-count // self.global_batch) * self.global_batch
        order = np.concatenate([order, order[: padded - count]])
        batches = []
        for start in range(0, padded, self.bucket_size):
            bucket = order[start: start + self.bucket_size]
            bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
            batches += [bucket[i: i + self.global_batch] for i in range(0, len(bucket), self.global_batch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        for batch in self.global_batches():
            yield batch[self.local_rank:: self.nranks].tolist()

    def __len__(self):
        return -(-len(self.lengths) // self.global_batch)

