"""The batches a training benchmark times: a few warm-up batches, then one whole pass over the subset.

Both sides of an A/B that use it (our loop, and PaddleNLP's Trainer given it as its batch sampler)
run exactly the same sentences in the same batches: the comparison is then of engines alone, and
every sentence of the subset is timed once, instead of a draw of batches whose lengths favour one
side. The pass is ``LengthGroupedBatchSampler``'s epoch (the same grouping and seed as training
uses); the warm-up batches are the first ones of the next epoch's order, so they come from the same
sentences but are not part of the timed pass.
"""
from __future__ import annotations

import numpy as np

from pipeline.sampling import LengthGroupedBatchSampler


class WarmupThenPassSampler(LengthGroupedBatchSampler):
    """``warmup_batches`` global batches, then this epoch's whole pass, sharded like its parent class."""

    def __init__(self, dataset, lengths, batch_size: int, seed: int, warmup_batches: int, bucket_batches: int = 50):
        super().__init__(dataset, lengths, batch_size, seed, bucket_batches)
        if warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, not {warmup_batches}")
        self.warmup_batches = warmup_batches

    def global_batches(self) -> list[np.ndarray]:
        epoch = self.epoch
        self.epoch = epoch + 1
        try:
            following = super().global_batches()
        finally:
            self.epoch = epoch
        warmup = [following[i % len(following)] for i in range(self.warmup_batches)]
        return warmup + super().global_batches()

    def pass_batches(self) -> int:
        """Global batches in the timed pass (one epoch of the parent sampler)."""
        return super().__len__()

    def __len__(self):
        return self.warmup_batches + self.pass_batches()
