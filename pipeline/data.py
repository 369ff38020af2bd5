"""Data: readers for three file layouts, tag normalisation, and token alignment.

Readers turn a file into ``Example``s (tokens plus strict-BIO labels) and fail
with the file, line and reason on anything they cannot read. The ``Aligner``
maps each token (a character for Chinese, a word otherwise) to word pieces
explicitly, token by token, so a character that yields no piece (a space, a
control character) can never shift a later label.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .asset_cache import data_dir, is_complete
from .labels import (MSRA_LABELS, OUTSIDE, TagError, bio_labels_for_types, entity_types, scheme_for_prefixes,
                     split_tag, to_bio)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label id that the loss skips: special tokens, later pieces of a word, padding
TSV_SEPARATOR = "\x02"  # PaddleHub's separator between characters (and between labels) in a TSV field
TSV_HEADER = ("text_a", "label")
EXTENSION_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".conll": "conll", ".txt": "conll",
                     ".bio": "conll", ".bmes": "conll", ".bioes": "conll"}
SPLIT_NAMES = ("train", "dev", "test")


class DataError(ValueError):
    """A data file that cannot be read: the message names the file, the line and the reason."""

    def __init__(self, path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass
class Example:
    """One sentence: its tokens and one strict-BIO label per token."""

    tokens: list[str]
    labels: list[str]
    source: str = ""  # "file:line" where the sentence starts, for messages


@dataclass
class ReadStats:
    """What reading a file did besides reading: repairs, skipped markers."""

    sentences: int = 0
    tokens: int = 0
    repaired_tags: int = 0
    skipped_docstart: int = 0


# ---------------------------------------------------------------- readers


def _decoded_lines(path: Path):
    """Yield ``(line_number, text)`` for each line, failing on bytes that are not UTF-8."""
    if not path.is_file():
        raise DataError(path, None, "file does not exist")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(path, number, f"not valid UTF-8 (byte {error.start}: {error.reason})") from None
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not data
            yield number, text.rstrip("\r\n")


def write_tsv(path, sentences) -> None:
    """Write ``(tokens, labels)`` pairs in PaddleHub's TSV layout, the one ``_read_tsv`` reads."""
    # newline="\n": the same bytes on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(TSV_HEADER) + "\n")
        for tokens, labels in sentences:
            handle.write(TSV_SEPARATOR.join(tokens) + "\t" + TSV_SEPARATOR.join(labels) + "\n")


def _read_tsv(path: Path):
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and tuple(fields) == TSV_HEADER:
            continue
        if len(fields) != 2:
            raise DataError(path, number, f"expected 2 tab-separated fields (text, labels), found {len(fields)}")
        tokens, tags = fields[0].split(TSV_SEPARATOR), fields[1].split(TSV_SEPARATOR)
        yield number, tokens, tags


def _read_conll(path: Path, stats: ReadStats):
    tokens: list[str] = []
    tags: list[str] = []
    start = None
    for number, line in _decoded_lines(path):
        if not line.strip():
            if tokens:
                yield start, tokens, tags
            tokens, tags, start = [], [], None
            continue
        fields = line.split()
        if fields[0] == "-DOCSTART-":  # CoNLL-2003 document marker, not a sentence
            stats.skipped_docstart += 1
            continue
        if len(fields) < 2:
            raise DataError(path, number, f"expected a token and a tag separated by whitespace, found {line!r}")
        # Extra middle columns (POS, chunk tags in CoNLL-2003) are allowed: token first, tag last.
        tokens.append(fields[0])
        tags.append(fields[-1])
        start = start or number
    if tokens:
        yield start, tokens, tags


def _read_jsonl(path: Path):
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, number, f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or "tokens" not in record or "labels" not in record:
            raise DataError(path, number, 'expected an object with "tokens" and "labels" lists')
        tokens, tags = record["tokens"], record["labels"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(path, number, '"tokens" must be a list of strings')
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(path, number, '"labels" must be a list of strings')
        yield number, tokens, tags


def detect_format(path: Path) -> str:
    """File layout from the extension: tsv, conll or jsonl."""
    data_format = EXTENSION_FORMATS.get(path.suffix.lower())
    if data_format is None:
        raise DataError(path, None, f"cannot tell the layout from extension {path.suffix!r}; "
                                    f"set data_format to one of tsv, conll, jsonl")
    return data_format


def read_examples(path, data_format: str = "auto", tag_scheme: str = "auto") -> tuple[list[Example], ReadStats]:
    """Read a labelled file and convert its tags to strict BIO, counting repairs."""
    path = Path(path)
    data_format = detect_format(path) if data_format == "auto" else data_format
    stats = ReadStats()
    if data_format == "tsv":
        rows = _read_tsv(path)
    elif data_format == "conll":
        rows = _read_conll(path, stats)
    elif data_format == "jsonl":
        rows = _read_jsonl(path)
    else:
        raise ValueError(f"unknown data format {data_format!r}")
    raw = []
    for number, tokens, tags in rows:
        if len(tokens) != len(tags):
            raise DataError(path, number, f"{len(tokens)} tokens but {len(tags)} labels")
        if not tokens or tokens == [""]:
            raise DataError(path, number, "sentence has no tokens")
        raw.append((number, tokens, tags))
    if not raw:
        raise DataError(path, None, "file holds no sentences")
    first_line_of_prefix: dict[str, int] = {}
    for number, _, tags in raw:
        for tag in tags:
            try:
                prefix, _ = split_tag(tag)
            except TagError as error:
                raise DataError(path, number, str(error)) from None
            first_line_of_prefix.setdefault(prefix, number)
    if tag_scheme == "auto":
        try:
            tag_scheme = scheme_for_prefixes(first_line_of_prefix)
        except TagError as error:
            where = ", ".join(f"{p!r} first on line {n}" for p, n in sorted(first_line_of_prefix.items()))
            raise DataError(path, None, f"{error} ({where})") from None
    examples = []
    for number, tokens, tags in raw:
        try:
            bio, conversion = to_bio(tags, tag_scheme)
        except TagError as error:
            raise DataError(path, number, str(error)) from None
        stats.repaired_tags += conversion.opened_span_repaired
        stats.tokens += len(tokens)
        examples.append(Example(tokens, bio, f"{path}:{number}"))
    stats.sentences = len(examples)
    return examples, stats


def check_labels(examples: list[Example], labels: list[str]) -> None:
    """Fail on the first label that is not in the label list, naming where it is."""
    known = set(labels)
    for example in examples:
        for label in example.labels:
            if label not in known:
                raise DataError(example.source.rpartition(":")[0], int(example.source.rpartition(":")[2]),
                                f"label {label!r} is not in the label list {labels}")


def label_list_from(examples: list[Example]) -> list[str]:
    """BIO label list for the entity types in the data, types sorted by name."""
    seen = entity_types(label for example in examples for label in example.labels)
    return bio_labels_for_types(sorted(seen))


# ---------------------------------------------------------------- splits


@dataclass
class DataSplits:
    """Train, dev and (optional) test examples with the label list they share."""

    train: list[Example]
    dev: list[Example]
    test: list[Example] | None
    labels: list[str]
    files: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _find_split_file(directory: Path, split: str) -> Path | None:
    matches = sorted(p for p in directory.glob(f"{split}.*") if p.suffix.lower() in EXTENSION_FORMATS)
    if len(matches) > 1:
        raise DataError(directory, None, f"several {split} files: {[p.name for p in matches]}; name one with {split}_file")
    return matches[0] if matches else None


def resolve_split_files(config) -> dict[str, Path | None]:
    """The train/dev/test files a config points to, failing if train or dev is missing."""
    if config.dataset == "msra_ner":
        directory = data_dir("msra_ner")
        if not is_complete(directory):
            raise DataError(directory, None, "MSRA-NER has not been fetched; run `python -m pipeline.assets fetch`")
    else:
        directory = Path(config.dataset)
        explicit = config.train_file and config.dev_file
        if not explicit and not directory.is_dir():
            raise DataError(directory, None, "dataset is neither 'msra_ner' nor an existing directory")
    files = {}
    for split in SPLIT_NAMES:
        given = getattr(config, f"{split}_file")
        if given:
            files[split] = Path(given)
        elif directory.is_dir():
            files[split] = _find_split_file(directory, split)
        else:
            files[split] = None
    for split in ("train", "dev"):
        if files[split] is None:
            raise DataError(directory, None, f"no {split} file found (expected {split}.tsv, {split}.conll, "
                                             f"{split}.txt or {split}.jsonl, or set {split}_file)")
    return files


def load_splits(config) -> DataSplits:
    """Read and check every split a config names, before any model is built."""
    files = resolve_split_files(config)
    splits, stats = {}, {}
    limits = {"train": config.max_train_examples, "dev": config.max_dev_examples, "test": config.max_test_examples}
    for split, path in files.items():
        if path is None or (split == "test" and not config.do_test):
            splits[split] = None
            continue
        examples, read_stats = read_examples(path, config.data_format, config.tag_scheme)
        if limits[split]:
            examples = examples[: limits[split]]
        splits[split] = examples
        stats[split] = read_stats
        logger.info("%s: %d sentences, %d tokens from %s (%d tags repaired: an I-/M-/E- opening a span became B-)",
                    split, len(examples), read_stats.tokens, path, read_stats.repaired_tags)
    if config.labels is not None:
        labels = list(config.labels)
    elif config.dataset == "msra_ner" and not config.train_file:
        labels = list(MSRA_LABELS)
    else:
        labels = label_list_from(splits["train"])
    for split in SPLIT_NAMES:
        if splits[split] is not None:
            check_labels(splits[split], labels)
    return DataSplits(splits["train"], splits["dev"], splits["test"], labels,
                      {k: str(v) if v else None for k, v in files.items()}, stats)


# ---------------------------------------------------------------- alignment


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

    def __init__(self, tokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.budget = max_seq_len - 2  # room for [CLS] and [SEP]
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self.unk_id = tokenizer.unk_token_id
        self._pieces: dict[str, tuple[int, ...]] = {}

    def pieces(self, token: str) -> tuple[int, ...]:
        """Word-piece ids of one token (empty for spaces and control characters); cached."""
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
    tokens_without_pieces: int = 0
    unknown_pieces: int = 0
    pieces: int = 0
    no_piece_characters: Counter = field(default_factory=Counter)


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
        for token in example.tokens:
            pieces = aligner.pieces(token)
            stats.pieces += len(pieces)
            stats.unknown_pieces += pieces.count(aligner.unk_id)
            if not pieces:
                stats.tokens_without_pieces += 1
                stats.no_piece_characters[token] += 1
    return features, stats


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

