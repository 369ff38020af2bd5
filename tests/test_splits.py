"""Which files a config names, read and checked before any model is built."""
from __future__ import annotations

import logging

from helpers import write_synthetic_splits
from pipeline.config import TrainConfig
from pipeline.readers import write_tsv
from pipeline.splits import load_splits


def test_a_dev_set_without_entities_is_warned_about_and_one_with_entities_is_not(tmp_path, caplog):
    write_synthetic_splits(tmp_path, {"train": 8, "dev": 4})
    config = TrainConfig(model="unused", dataset=str(tmp_path), do_test=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        load_splits(config)
    assert "holds no entity" not in caplog.text
    write_tsv(tmp_path / "dev.tsv", [(list("今天去工作"), ["O"] * 5), (list("读书"), ["O", "O"])])
    with caplog.at_level(logging.WARNING, logger="pipeline.splits"):
        splits = load_splits(config)
    assert len(splits.dev) == 2
    assert "dev (" in caplog.text and "dev.tsv) holds no entity" in caplog.text and "cannot select a model" in caplog.text
