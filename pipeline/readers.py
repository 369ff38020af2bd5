"""Readers: PaddleHub TSV, CoNLL and JSONL files into ``Example``s in strict BIO.

Each reader fails with the file, line and reason on anything it cannot read,
so a bad data file stops a run before any model is built, and the message
says where to look. Tags of any scheme (BIO, BIOES, BMES) are converted here,
so everything downstream sees strict BIO only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .files import not_a_file
from .labels import TagError, bio_labels_for_types, entity_types, scheme_for_prefixes, split_tag, to_bio

TSV_SEPARATOR = "\x02"  # PaddleHub's separator between characters (and between labels) in a TSV field
TSV_HEADER = ("text_a", "label")
EXTENSION_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".conll": "conll", ".txt": "conll",
                     ".bio": "conll", ".bmes": "conll", ".bioes": "conll"}


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


def _decoded_lines(path: Path):
    """Yield ``(line_number, text)`` for each line, failing on bytes that are not UTF-8."""
    problem = not_a_file(path)
    if problem:
        raise DataError(path, None, f"file {problem}")
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
        if "" in tokens:
            # A token of zero characters has no piece: its label could never be learnt nor predicted.
            raise DataError(path, number, f"token {tokens.index('') + 1} of {len(tokens)} is empty (zero "
                                          f"characters; two separators in a row?)")
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
