"""Alignment: tokens to word pieces, one token at a time, in windows instead of truncation.

The ``Aligner`` maps each token (a character for Chinese, a word otherwise)
to word pieces explicitly, token by token, so a character that yields no
piece (a space, a control character) can never shift a later label. A
sentence longer than the model's input is cut into windows that cover every
token, so no label is dropped by truncation. Characters the vocabulary lacks are
replaced by the checkpoint's character mapping (``pipeline.char_mapping``) just
before tokenising, one character for one, so tokens and outputs keep the original.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .labels import IGNORE_INDEX, OUTSIDE
from .readers import Example


@dataclass
class Window:
    """One model input: a slice ``[start, end)`` of a sentence's tokens as word-piece ids."""

    input_ids: list[int]
    start: int
    end: int
    # For each token in [start, end): position of its first piece in input_ids, or -1 if it has none.
    first_positions: list[int]


def plan_windows(piece_counts: list[int], budget: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Split tokens into ``[start, end)`` windows of at most ``budget`` pieces.

    Consecutive windows share about ``overlap`` pieces (0 for training, where
    every token must be labelled exactly once). ``piece_counts`` must already
    be clipped to ``budget``.
    """
    count = len(piece_counts)
    if count == 0:
        return [(0, 0)]
    windows = []
    start = 0
    while True:
        end, used = start, 0
        while end < count and used + piece_counts[end] <= budget:
            used += piece_counts[end]
            end += 1
        windows.append((start, end))
        if end >= count:
            return windows
        # Step back from the end until about `overlap` pieces are shared; always move forward by one token.
        next_start, shared = end, 0
        while next_start > start + 1 and shared + piece_counts[next_start - 1] <= overlap:
            shared += piece_counts[next_start - 1]
            next_start -= 1
        start = next_start


class Aligner:
    """Maps tokens to word pieces one token at a time, and builds model inputs."""

    def __init__(self, tokenizer, max_seq_len: int, char_mapping: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.char_mapping = dict(char_mapping or {})
        self._translation = str.maketrans(self.char_mapping)
        self.max_seq_len = max_seq_len
        self.budget = max_seq_len - 2  # room for [CLS] and [SEP]
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.unk_id = tokenizer.unk_token_id
        self._pieces: dict[str, tuple[int, ...]] = {}

    def pieces(self, token: str) -> tuple[int, ...]:
        """Word-piece ids of one token after the character mapping (empty for spaces and control
        characters); cached."""
        return self.unmapped_pieces(token.translate(self._translation))

    def unmapped_pieces(self, token: str) -> tuple[int, ...]:
        """Word-piece ids of one token as it is, without the character mapping; cached."""
        ids = self._pieces.get(token)
        if ids is None:
            ids = tuple(self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(token)))
            # A word longer than a whole window keeps its first pieces: the first one carries its label.
            ids = ids[: self.budget]
            self._pieces[token] = ids
        return ids

    def windows(self, tokens: list[str], overlap: int = 0) -> list[Window]:
        """Model inputs covering every token; consecutive windows share ~``overlap`` pieces."""
        token_pieces = [self.pieces(token) for token in tokens]
        result = []
        for start, end in plan_windows([len(p) for p in token_pieces], self.budget, overlap):
            input_ids = [self.cls_id]
            first_positions = []
            for pieces in token_pieces[start:end]:
                first_positions.append(len(input_ids) if pieces else -1)
                input_ids.extend(pieces)
            input_ids.append(self.sep_id)
            result.append(Window(input_ids, start, end, first_positions))
        return result

    def training_features(self, example: Example, label2id: dict[str, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input_ids, label_ids)`` per window: each token's label on its first piece, -100 elsewhere."""
        features = []
        for window in self.windows(example.tokens, overlap=0):
            label_ids = np.full(len(window.input_ids), IGNORE_INDEX, dtype=np.int64)
            for offset, position in enumerate(window.first_positions):
                if position >= 0:
                    label_ids[position] = label2id[example.labels[window.start + offset]]
            features.append((np.asarray(window.input_ids, dtype=np.int64), label_ids))
        return features


@dataclass
class FeatureStats:
    """What turning examples into features did: windows, tokens without pieces, unknown pieces."""

    examples: int = 0
    windows: int = 0
    split_examples: int = 0
    tokens: int = 0
    tokens_without_pieces: int = 0
    unknown_pieces: int = 0
    unknown_pieces_unmapped: int = 0  # what ``unknown_pieces`` would be without the character mapping
    pieces: int = 0
    no_piece_characters: Counter = field(default_factory=Counter)
    mapped_tokens: Counter = field(default_factory=Counter)  # tokens the character mapping changed


def build_training_features(examples: list[Example], aligner: Aligner, labels: list[str]):
    """All training windows for ``examples``, and what it took to make them."""
    label2id = {label: i for i, label in enumerate(labels)}
    features = []
    stats = FeatureStats(examples=len(examples))
    for example in examples:
        windows = aligner.training_features(example, label2id)
        features.extend(windows)
        stats.windows += len(windows)
        stats.split_examples += len(windows) > 1
        stats.tokens += len(example.tokens)
        for token in example.tokens:
            pieces, unmapped = aligner.pieces(token), aligner.unmapped_pieces(token)
            stats.pieces += len(pieces)
            stats.unknown_pieces += pieces.count(aligner.unk_id)
            stats.unknown_pieces_unmapped += unmapped.count(aligner.unk_id)
            if pieces != unmapped:
                stats.mapped_tokens[token] += 1
            if not pieces:
                stats.tokens_without_pieces += 1
                stats.no_piece_characters[token] += 1
    return features, stats


def fill_tokens_without_pieces(labels: list[str], has_pieces: list[bool]) -> list[str]:
    """Give tokens that the model never saw a label from their neighbours.

    A token with no word piece (a space) inside an entity, between ``X`` tags
    that continue each other, becomes ``I-X``; anywhere else it is ``O``.
    """
    filled = list(labels)
    previous = OUTSIDE
    for i, seen in enumerate(has_pieces):
        if seen:
            previous = filled[i]
            continue
        following = next((filled[j] for j in range(i + 1, len(filled)) if has_pieces[j]), OUTSIDE)
        inside = previous != OUTSIDE and following == f"I-{previous[2:]}"
        filled[i] = following if inside else OUTSIDE
        previous = filled[i] if inside else OUTSIDE
    return filled
