"""The training loader: windows tokenised once into memory, a sampler that shards them, a padding collator."""
from __future__ import annotations

import logging

from paddle.io import DataLoader, Dataset, DistributedBatchSampler

from .alignment import Aligner, FeatureStats, build_training_features
from .collate import TrainingCollator
from .config import TrainConfig
from .readers import Example
from .sampling import LengthGroupedBatchSampler

logger = logging.getLogger("pipeline.trainer")


class FeatureDataset(Dataset):
    """Training windows held in memory: tokenised once, before the first step."""

    def __init__(self, features):
        self.features = features

    def __getitem__(self, index):
        return self.features[index]

    def __len__(self):
        return len(self.features)


def unknown_pieces_line(stats: FeatureStats, char_mapping: dict[str, str]) -> str:
    """The log line saying how many training pieces are [UNK], before and after the character mapping."""

    def count(unknown: int) -> str:
        return f"{unknown:,} ({unknown / max(stats.tokens, 1):.2%})"

    line = f"[UNK] pieces in train: {count(stats.unknown_pieces_unmapped)}"
    if not char_mapping:  # char_mapping: off, or a vocabulary that lacks nothing the candidates could give
        return f"{line} of {stats.tokens:,} tokens; no character mapping"
    return (f"{line} -> {count(stats.unknown_pieces)} of {stats.tokens:,} tokens with the character mapping "
            f"(most mapped: {dict(stats.mapped_tokens.most_common(5))})")


def build_train_loader(examples: list[Example], aligner: Aligner, labels: list[str], config: TrainConfig,
                       log: bool = True) -> tuple[DistributedBatchSampler, DataLoader]:
    """The sampler (``set_epoch`` before each epoch) and the loader over the training windows."""
    features, stats = build_training_features(examples, aligner, labels)
    if log:
        logger.info("train features: %d windows from %d sentences (%d split because longer than "
                    "max_seq_len=%d), %d word pieces, %d tokens without any piece %s",
                    stats.windows, stats.examples, stats.split_examples, config.max_seq_len,
                    stats.pieces, stats.tokens_without_pieces, dict(stats.no_piece_characters.most_common(5)))
        logger.info(unknown_pieces_line(stats, aligner.char_mapping))
    dataset = FeatureDataset(features)
    if config.group_by_length:
        sampler = LengthGroupedBatchSampler(dataset, [len(f[0]) for f in features], config.batch_size, config.seed)
    else:
        # Shuffles with the epoch as seed (set_epoch), identically on every rank, then shards.
        sampler = DistributedBatchSampler(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=TrainingCollator(aligner.pad_id),
                        num_workers=config.num_workers, return_list=True)
    return sampler, loader
