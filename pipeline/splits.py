"""Splits: which train/dev/test files a config names, read and checked against one label list.

Every split a run will use is read and checked here, before any model is
built, so a missing file or a label outside the list stops the run at once
instead of after the model has loaded (or, for test, after training).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .asset_cache import data_dir, is_complete
from .labels import MSRA_LABELS, OUTSIDE, bio_labels_for_types, entity_types
from .msra import MSRA_NAME
from .readers import EXTENSION_FORMATS, DataError, Example, check_labels, read_examples

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "dev", "test")


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
    if config.dataset == MSRA_NAME:
        directory = data_dir(MSRA_NAME)
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
    for split in SPLIT_NAMES:
        # Before any file is read: a mistyped dev_file should not wait for train to be read first.
        if getattr(config, f"{split}_file") and not files[split].is_file() and (split != "test" or config.do_test):
            raise DataError(files[split], None, f"{split}_file does not exist" if not files[split].exists()
                            else f"{split}_file is not a file")
    return files


def _warn_about_shared_files(files: dict[str, Path | None]) -> None:
    """Warn when one file serves as two splits: its scores then say nothing about unseen text."""
    used = [(split, path) for split, path in files.items() if path is not None]
    for index, (split, path) in enumerate(used):
        for other, other_path in used[:index]:
            if os.path.samefile(path, other_path):
                why = ("the model is trained on it" if other == "train" else "the model is selected on it")
                logger.warning("%s and %s are the same file (%s): %s scores overstate accuracy on unseen text, "
                               "as %s; use separate files", other, split, path, split, why)


def _labels_with_types_unseen_in_train(splits: dict, files: dict) -> list[str]:
    """The label list read from the data: train's entity types, and with a warning those only dev or
    test hold (kept, so that their entities count as missed rather than vanishing from the scores)."""
    train_types = set(entity_types(label for example in splits["train"] for label in example.labels))
    found = set(train_types)
    for split in ("dev", "test"):
        if splits[split] is None:
            continue
        unseen = {}
        for example in splits[split]:
            for kind in entity_types(example.labels):
                if kind not in train_types:
                    unseen.setdefault(kind, example.source)
        if unseen:
            logger.warning("%s (%s) holds entity type(s) that train never shows: %s; the model cannot learn "
                           "them, so their entities count as missed in every %s score", split, files[split],
                           ", ".join(f"{kind} (first at {source})" for kind, source in sorted(unseen.items())),
                           split)
            found |= set(unseen)
    return bio_labels_for_types(sorted(found))


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
    elif config.dataset == MSRA_NAME and not config.train_file:
        labels = list(MSRA_LABELS)
    else:
        labels = _labels_with_types_unseen_in_train(splits, files)
    _warn_about_shared_files({split: files[split] for split in SPLIT_NAMES if splits[split] is not None})
    for split in SPLIT_NAMES:
        if splits[split] is not None:
            check_labels(splits[split], labels)
    if not any(label != OUTSIDE for example in splits["dev"] for label in example.labels):
        # Every evaluation then scores 0.0: best_model/ stays at the first one and early stopping fires.
        logger.warning("dev (%s) holds no entity: precision, recall and F1 are 0.0 at every evaluation, so the "
                       "dev set cannot select a model (best_model/ keeps the first evaluation's weights and "
                       "early stopping counts every later one as no gain); use a dev file with entities",
                       files["dev"])
    return DataSplits(splits["train"], splits["dev"], splits["test"], labels,
                      {k: str(v) if v else None for k, v in files.items()}, stats)
