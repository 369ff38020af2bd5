"""The short names of the Python API (see ``pipeline/__init__.py``)."""
from __future__ import annotations

from .config import TrainConfig
from .models import build_token_classifier, build_tokenizer, check_weights_available, resolve_model
from .splits import DataSplits, load_splits


def load_dataset(config: TrainConfig) -> DataSplits:
    """Read and check train/dev/test as the config names them."""
    return load_splits(config)


def load_model(name_or_path: str, labels: list[str], lower_case: bool | None = None, head: str = "linear"):
    """``(model, tokenizer)``: an encoder with a token-classification head ('linear' or 'crf') for ``labels``."""
    spec = resolve_model(name_or_path)
    check_weights_available(spec)
    return build_token_classifier(spec, labels, head), build_tokenizer(spec, lower_case)
