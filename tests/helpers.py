"""What several test modules share: the tiny synthetic corpus, tiny BERTs in Paddle and PyTorch layout,
the real entry points' environment and overrides, a trainer factory and seqeval cross-checks.

Paddle and PaddleNLP are imported inside the functions that need them, so that conftest.py can import
this module (for the corpus) before any test sets up Paddle, and after it has set the thread variables.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the synthetic corpus

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


def write_tiny_bert(directory: Path, vocab: list[str], seed: int) -> Path:
    """A 2-layer, 32-wide random BERT over ``vocab`` in Paddle layout, with its vocab.txt, in ``directory``."""
    import paddle
    from paddlenlp.transformers import BertConfig, BertModel, BertTokenizer

    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    paddle.seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    BertModel(config).save_pretrained(str(directory))
    BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(str(directory))
    return directory


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


def write_synthetic_splits(directory: Path, sizes: dict[str, int], seed: int = 7) -> Path:
    """``{split}.tsv`` of ``sizes[split]`` synthetic sentences each, drawn in the order of ``sizes``."""
    from pipeline.readers import write_tsv

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in sizes.items():
        write_tsv(directory / f"{split}.tsv", [synthetic_sentence(rng) for _ in range(count)])
    return directory


# ---------------------------------------------------------------- tiny BERTs, Paddle and PyTorch layout

# Special tokens, lower-case letters only (like m3e-small's vocabulary), digits, a few Chinese characters.
LOWER_CASE_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [str(d) for d in range(10)]
    + list("中国北京上海天津广州深圳人民银行大学")
    + list("王李张刘陈杨黄赵周吴徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢")
)


def tiny_bert_config(**overrides):
    """A 2-layer, 32-wide ``BertConfig`` over ``LOWER_CASE_VOCAB``."""
    from paddlenlp import transformers

    settings = dict(
        vocab_size=len(LOWER_CASE_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
    )
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def write_tokenizer(directory: Path, do_lower_case: bool) -> None:
    """``LOWER_CASE_VOCAB`` as vocab.txt plus a saved ``BertTokenizer`` in ``directory``."""
    from paddlenlp import transformers

    (directory / "vocab.txt").write_text("\n".join(LOWER_CASE_VOCAB) + "\n", encoding="utf-8")
    transformers.BertTokenizer(str(directory / "vocab.txt"), do_lower_case=do_lower_case).save_pretrained(
        str(directory)
    )


def numpy_state(layer) -> dict[str, np.ndarray]:
    """A layer's state dict as numpy arrays, for exact comparisons."""
    return {name: tensor.numpy() for name, tensor in layer.state_dict().items()}


# PaddleNLP BertModel parameter names -> Hugging Face BertModel names, written out
# independently of PaddleNLP's own converter so that the round trip tests it.
_PADDLE_TO_HF = [
    (r"embeddings\.layer_norm\.", "embeddings.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.layer.\1.attention.self.query."),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.layer.\1.attention.self.key."),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.layer.\1.attention.self.value."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"encoder\.layers\.(\d+)\.linear1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"encoder\.layers\.(\d+)\.linear2\.", r"encoder.layer.\1.output.dense."),
    (r"encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.output.LayerNorm."),
]


def hf_state(paddle_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Paddle BertModel state renamed and transposed into Hugging Face's PyTorch layout."""
    hf = {}
    for name, value in paddle_state.items():
        hf_name = name
        for pattern, replacement in _PADDLE_TO_HF:
            hf_name = re.sub(pattern, replacement, hf_name)
        # Paddle's Linear stores [in, out]; PyTorch's stores [out, in]. Embeddings are not transposed.
        is_linear_weight = name.endswith(".weight") and value.ndim == 2 and "embeddings" not in name
        hf[hf_name] = np.ascontiguousarray(value.T if is_linear_weight else value)
    return hf


class _Global:
    """A module global written into a pickle by name, without importing it (torch is absent here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's REDUCE requires a callable; never called
        raise TypeError("a pickling stand-in")


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        shape = tuple(self.storage.array.shape)
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))  # C order, in elements
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, shape, strides, False, collections.OrderedDict()),
        )


class _TorchFormatPickler(pickle._Pickler):
    """Writes the pickle half of PyTorch's zip checkpoint format (storages by persistent id)."""

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.array.size)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)


def write_torch_checkpoint(path: Path, state: dict[str, np.ndarray]) -> None:
    """A pytorch_model.bin in torch.save's zip layout, float32, written without torch."""
    storages = {
        name: _Storage(str(index), value.astype(np.float32)) for index, (name, value) in enumerate(state.items())
    }
    buffer = io.BytesIO()
    _TorchFormatPickler(buffer, protocol=2).dump(
        collections.OrderedDict((name, _Tensor(storage)) for name, storage in storages.items())
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        # data.pkl first: PaddleNLP finds the archive prefix from the first entry's name.
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for storage in storages.values():
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())
        archive.writestr("archive/version", "3\n")


def make_torch_dir(directory: Path, paddle_state: dict[str, np.ndarray], config) -> Path:
    """A Hugging Face PyTorch-layout BERT directory (config.json, pytorch_model.bin, tokenizer) of a Paddle state."""
    directory.mkdir(parents=True)
    hf_config = {
        "architectures": ["BertModel"], "model_type": "bert", "transformers_version": "4.30.0",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
        "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }
    (directory / "config.json").write_text(json.dumps(hf_config), encoding="utf-8")
    write_torch_checkpoint(directory / "pytorch_model.bin", hf_state(paddle_state))
    # m3e-small's tokenizer_config says do_lower_case=false; mimic it.
    write_tokenizer(directory, do_lower_case=False)
    return directory


def per_token_model(vocab_size: int, num_labels: int, seed: int = 0):
    """A token classifier whose logits depend on the token id alone: windowing must not change any prediction."""
    import paddle

    class PerTokenModel(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.table = paddle.nn.Embedding(vocab_size, num_labels)
            rng = np.random.default_rng(seed)
            self.table.weight.set_value(rng.normal(size=(vocab_size, num_labels)).astype("float32"))

        def forward(self, input_ids, token_type_ids=None, **unused):
            return self.table(input_ids)

    return PerTokenModel()


# ---------------------------------------------------------------- the real entry points


def clean_env() -> dict:
    """The environment for train_dist.py and the launcher, as a user's shell would give it."""
    env = dict(os.environ)
    # Any CUDA_VISIBLE_DEVICES, even empty, makes the launcher assume GPUs.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FLAGS_paddle_num_threads"):
        env.pop(name, None)  # let the entry point choose per worker, as it does for users
    env["PYTHONUNBUFFERED"] = "1"
    return env


def overrides(model_dir, data_dir, out_dir, **extra) -> list[str]:
    """``key=value`` overrides for a short run of the tiny model on the tiny corpus."""
    values = dict(model=str(model_dir), dataset=str(data_dir), checkpoint_dir=str(out_dir), max_seq_len=32,
                  batch_size=8, eval_batch_size=8, max_steps=4, eval_interval=2, log_interval=1,
                  learning_rate=1e-3, warmup_ratio=0.0, use_vdl=True)
    values.update(extra)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def every_layer_runs(model, layer_type, forward) -> bool:
    """Whether ``model`` has layers of exactly ``layer_type`` and each has ``forward`` installed as its forward."""
    layers = [layer for layer in model.sublayers() if type(layer) is layer_type]
    return bool(layers) and all(getattr(layer.forward, "__func__", None) is forward for layer in layers)


def make_trainer(model_dir, data_dir, out_dir, **overrides):
    """A ``Trainer`` of the tiny model on the tiny corpus, built the way train_dist.py builds one."""
    import paddle

    from pipeline.config import TrainConfig
    from pipeline.splits import load_splits
    from pipeline.models import build_token_classifier, build_tokenizer, resolve_model
    from pipeline.trainer import Trainer

    values = dict(model=str(model_dir), dataset=str(data_dir), checkpoint_dir=str(out_dir), max_seq_len=32,
                  batch_size=8, eval_batch_size=16, log_interval=1, learning_rate=3e-3, warmup_ratio=0.0,
                  use_vdl=False, seed=11)
    values.update(overrides)
    config = TrainConfig(**values)
    splits = load_splits(config)
    spec = resolve_model(config.model)
    paddle.seed(config.seed)
    return Trainer(config, build_token_classifier(spec, splits.labels, config.head), build_tokenizer(spec), splits)


# ---------------------------------------------------------------- seqeval cross-checks


def assert_matches_seqeval(reported: dict, gold: list[list[str]], predicted: list[list[str]]) -> None:
    """Reported precision, recall and F1 equal seqeval's on the same labels: its default mode for the
    conlleval-style (plain) keys, its strict IOB2 mode for the ``strict_`` keys."""
    import warnings

    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns (and gives 0.0) when nothing was predicted
        for prefix, mode in (("", {}), ("strict_", {"mode": "strict", "scheme": IOB2})):
            for name, function in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
                assert reported[prefix + name] == pytest.approx(function(gold, predicted, **mode)), prefix + name


def assert_test_metrics_match_seqeval(out_dir: Path, test_file: Path):
    """The saved test predictions, gathered from every rank, give seqeval the metrics we reported."""
    from pipeline.readers import read_examples

    records = [json.loads(line) for line in (out_dir / "test_predictions.jsonl").read_text().splitlines()]
    examples, _ = read_examples(test_file)
    assert [r["tokens"] for r in records] == [e.tokens for e in examples]  # every sentence, in file order
    assert [r["gold"] for r in records] == [e.labels for e in examples]
    reported = json.loads((out_dir / "test_metrics.json").read_text())["test"]
    assert_matches_seqeval(reported, [r["gold"] for r in records], [r["predicted"] for r in records])


# Texts every prediction engine must label alike: empty and blank lines, mixed scripts and emoji, an
# ideographic space, a text of several windows at max_seq_len=32, control characters, one character.
ENGINE_TEXTS = [
    "张三在北京工作。",
    "",
    "   ",
    "NASA 2022年访问nasa😀",
    "李四\u3000去上海，王小明在清华大学读书",
    "新华社北京5月7日电" * 30,          # 300 characters: several windows at max_seq_len=32
    "控制\x01字符\x7f",
    "王",
]


def labels_of(predictor, texts=ENGINE_TEXTS):
    return [r["labels"] for r in predictor.predict(texts)]


def stubborn_or_killed(role: int) -> None:
    """A prediction worker's task for the pool tests: role 0 outlives SIGTERM, role 1 dies of SIGKILL."""
    import signal
    import time

    if role == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a worker stuck in a signal handler would
        time.sleep(120)
    else:
        time.sleep(3)  # the other worker has its task and ignores SIGTERM by now
        os.kill(os.getpid(), signal.SIGKILL)
