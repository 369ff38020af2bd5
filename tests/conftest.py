"""Shared fixtures: a tiny random BERT and a tiny synthetic NER corpus, built in the test run."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread per test process: tests may run beside other work on two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLAGS_paddle_num_threads", "1")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PEOPLE = ["张三", "李四", "王小明", "赵敏", "周杰"]
PLACES = ["北京", "上海", "广州", "南京", "纽约"]
ORGS = ["新华社", "清华大学", "联合国", "中国银行"]
FILLER = "在的了是和去年月日到工作读书访问说今天"
EXTRA_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz，。！？、：（）"


def tiny_vocab() -> list[str]:
    """Special tokens, then every character the synthetic corpus and the tests use."""
    chars = dict.fromkeys("".join(PEOPLE + PLACES + ORGS) + FILLER + EXTRA_CHARS)
    return SPECIAL_TOKENS + list(chars) + ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"]


def synthetic_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """A short sentence of filler and entities, tagged in BIO per character."""
    chars, tags = [], []
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["O", "PER", "LOC", "ORG", "O"])
        if kind == "O":
            piece = "".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))
            chars += list(piece)
            tags += ["O"] * len(piece)
        else:
            piece = rng.choice({"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}[kind])
            chars += list(piece)
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(piece) - 1)
    return chars, tags


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT in Paddle layout with its vocab.txt."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import paddle
    from paddlenlp.transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny_bert")
    vocab = tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    paddle.seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(str(directory))
    BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """train/dev/test.tsv of synthetic sentences (seeded)."""
    from pipeline.readers import write_tsv

    directory = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(7)
    for split, count in (("train", 96), ("dev", 24), ("test", 24)):
        write_tsv(directory / f"{split}.tsv", [synthetic_sentence(rng) for _ in range(count)])
    return directory


def assert_matches_seqeval(reported: dict, gold: list[list[str]], predicted: list[list[str]]) -> None:
    """Reported precision, recall and F1 equal seqeval's strict IOB2 figures on the same labels."""
    import warnings

    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns (and gives 0.0) when nothing was predicted
        for name, function in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            assert reported[name] == pytest.approx(function(gold, predicted, mode="strict", scheme=IOB2)), name
