"""Shared fixtures: a tiny random BERT and a tiny synthetic NER corpus, built in the test run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per test process: tests may run beside other work on two cores. Set before anything
# imports Paddle.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLAGS_paddle_num_threads", "1")

# The shared assertion helpers report failures as the tests' own asserts do.
pytest.register_assert_rewrite("helpers")

from helpers import tiny_vocab, write_synthetic_splits, write_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT in Paddle layout with its vocab.txt."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tiny_vocab(), seed=0)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """train/dev/test.tsv of synthetic sentences (seeded)."""
    return write_synthetic_splits(tmp_path_factory.mktemp("tiny_data"), {"train": 96, "dev": 24, "test": 24})


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """An untrained (seeded) checkpoint of the tiny BERT with MSRA's labels, as training saves best_model/."""
    import paddle
    from paddlenlp.transformers import BertTokenizer

    from pipeline.checkpoint import save_model_checkpoint
    from pipeline.config import TrainConfig
    from pipeline.labels import MSRA_LABELS
    from pipeline.models import build_token_classifier, resolve_model

    paddle.seed(1)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), MSRA_LABELS)
    directory = tmp_path_factory.mktemp("ckpt") / "best_model"
    save_model_checkpoint(directory, model, BertTokenizer.from_pretrained(str(tiny_model_dir)),
                          TrainConfig(model=str(tiny_model_dir), max_seq_len=32), MSRA_LABELS, metrics={})
    return directory
