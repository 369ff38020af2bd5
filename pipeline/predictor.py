"""The Predictor: batch NER from a checkpoint directory alone, and which engine runs it.

``Predictor.from_checkpoint`` chooses the engine (``ENGINES``): the dynamic
graph over the checkpoint's weights, or a static export of those same weights
found beside the checkpoint (``find_static_model``) and run by Paddle Inference.
Both label through the same ``TokenLabeller``, so they give the same labels.

Paddle and the engines are imported inside ``from_checkpoint``, not at module
level: CLIs import ``ENGINES`` for their ``--engine`` choices before
``pipeline.cpu_env`` has set the thread variables Paddle reads when imported.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .text import character_labels, entities_of, split_text

if TYPE_CHECKING:
    from .labeller import TokenLabeller

ENGINES = ("auto", "dynamic", "static")
INFERENCE_DIR_NAME = "inference"
# Arithmetic of the static engine (Paddle Inference) per device, default first; a new one (e.g. int8 on
# CPU) goes in its device's tuple and in StaticEngine's mapping.
PRECISIONS = {"cpu": ("fp32",), "gpu": ("fp32", "fp16")}
ALL_PRECISIONS = tuple(dict.fromkeys(p for choices in PRECISIONS.values() for p in choices))


def precision_problem(precision: str, device: str, engine: str) -> str | None:
    """Why ``precision`` cannot be used on ``device`` ('cpu'/'gpu') with ``engine``, or None if it can."""
    if precision not in PRECISIONS[device]:
        return (f"--precision {precision} is not available on {device.upper()} "
                f"(there: {', '.join(PRECISIONS[device])})")
    if precision != PRECISIONS[device][0] and engine != "static":
        # Only Paddle Inference has the reduced precisions; auto could quietly fall back to the dynamic graph.
        return f"--precision {precision} is the static engine's (Paddle Inference): add --engine static"
    return None


class StaticModelWarning(UserWarning):
    """engine='auto' found no usable static model (none, incomplete or stale) and runs the dynamic graph."""


def static_model_candidates(directory, inference_dir=None) -> list[Path]:
    """Where a checkpoint's static model is looked for, in order."""
    if inference_dir is not None:
        return [Path(inference_dir)]
    directory = Path(directory)
    return [directory / INFERENCE_DIR_NAME, directory.parent / INFERENCE_DIR_NAME]


def find_static_model(directory, inference_dir=None) -> tuple[Path | None, str, bool]:
    """``(export directory, reason, found)``: the first candidate holding a current export of the
    checkpoint's weights, or ``(None, why none is usable, whether an unusable export was found)``."""
    from .checkpoint import read_meta
    from .static_export import checkpoint_weights_sha256, export_status, model_files

    read_meta(directory)  # a missing or broken checkpoint is reported as such, not as a missing export
    absent = []
    for candidate in static_model_candidates(directory, inference_dir):
        if inference_dir is None and model_files(candidate) is None:
            absent.append(f"no static model in {candidate}")
            continue
        usable, reason = export_status(candidate, directory, checkpoint_weights_sha256(directory))
        # A stale or broken export is reported even if a later candidate is also absent.
        return (candidate if usable else None), reason, True
    return None, "; ".join(absent) + " (export one with python -m pipeline.export)", False


class Predictor:
    """Batch NER prediction from a saved checkpoint directory alone."""

    def __init__(self, labeller: TokenLabeller, text_unit: str):
        self.labeller = labeller
        self.text_unit = text_unit

    @classmethod
    def from_checkpoint(cls, directory, batch_size: int = 32, max_seq_len: int | None = None,
                        use_gpu: bool = False, engine: str = "auto", inference_dir=None,
                        static_options: dict | None = None, precision: str = "fp32",
                        decoding: str | None = None) -> "Predictor":
        """Load tokenizer, label map and a model from ``directory`` (e.g. ``.../best_model``).

        ``engine``: ``"dynamic"`` runs the checkpoint's weights in the dynamic graph;
        ``"static"`` runs the static model exported by ``python -m pipeline.export``
        through Paddle Inference and fails (CheckpointError) if there is none or it
        was exported from other weights; ``"auto"`` uses the static model when one
        is found and current, else warns and runs the dynamic graph. The static
        model is looked for in ``inference_dir`` if given, else in
        ``directory/inference`` and then ``directory/../inference``. ``static_options``
        (``onednn``, ``ir_optim``, ``threads``...) go to ``StaticEngine``. ``precision``: one of
        ``PRECISIONS`` for the device (``use_gpu``); other than the default, only with the static engine.
        ``decoding`` (``constrained`` or ``argmax``) overrides the one the checkpoint records.
        """
        import paddle

        from .checkpoint import (CheckpointError, load_char_mapping, load_crf_transitions, load_inference_bundle,
                                 load_tokenizer_and_meta, read_meta, saved_decoding)
        from .decoding import DECODINGS
        from .alignment import Aligner
        from .engines import DynamicEngine, StaticEngine
        from .labeller import TokenLabeller

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        problem = precision_problem(precision, "gpu" if use_gpu else "cpu", engine)
        if problem:
            raise ValueError(problem)
        if decoding is not None and decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        # Read before any model is built: a bad recorded value fails at once.
        decoding = decoding or saved_decoding(directory, read_meta(directory))
        if max_seq_len is not None:
            _check_window_fits(directory, max_seq_len)
        paddle.set_device("gpu" if use_gpu else "cpu")
        static_dir = None
        if engine != "dynamic":
            static_dir, reason, found = find_static_model(directory, inference_dir)
            if static_dir is None:
                if engine == "static":
                    raise CheckpointError(f"engine='static': {reason}")
                if found:  # no export at all is the normal case: no warning
                    warnings.warn(f"{reason}; using the dynamic graph", StaticModelWarning, stacklevel=2)
        if static_dir is not None:
            meta, tokenizer = load_tokenizer_and_meta(directory)
            runner = StaticEngine(static_dir, use_gpu=use_gpu, transitions=load_crf_transitions(directory),
                                  precision=precision, **(static_options or {}))
            labels, text_unit, trained_len = meta["labels"], meta["text_unit"], int(meta["max_seq_len"])
        else:
            bundle = load_inference_bundle(directory)
            runner, tokenizer = DynamicEngine(bundle.model), bundle.tokenizer
            labels, text_unit, trained_len = bundle.labels, bundle.text_unit, bundle.max_seq_len
        # The mapping saved at training time, not one derived anew: the model must see what it was trained on.
        aligner = Aligner(tokenizer, max_seq_len or trained_len, load_char_mapping(directory))
        return cls(TokenLabeller(runner, aligner, labels, batch_size, decoding=decoding), text_unit)

    @property
    def engine_name(self) -> str:
        """``"dynamic"`` or ``"static"``: what runs the model."""
        return getattr(self.labeller.engine, "name", type(self.labeller.engine).__name__)

    def predict(self, texts: list[str]) -> list[dict]:
        """One result per text, in order: ``{"text", "labels", "entities"}``."""
        units = [split_text(text, self.text_unit) for text in texts]
        token_labels = self.labeller.label([u.tokens for u in units])
        results = []
        for text, unit, labels in zip(texts, units, token_labels):
            per_character = character_labels(text, unit, labels)
            results.append({"text": text, "labels": per_character, "entities": entities_of(text, per_character)})
        return results


def _check_window_fits(directory, max_seq_len: int) -> None:
    """A window longer than the checkpoint's position embeddings fails inside the model, on the first
    long text: refused here instead (CheckpointError naming the limit)."""
    from .checkpoint import MODEL_CONFIG_FILE, CheckpointError
    from .files import read_json_object
    from .models import input_token_limit

    path = Path(directory) / MODEL_CONFIG_FILE
    limit = input_token_limit(read_json_object(path, CheckpointError, "the checkpoint is damaged"))
    if limit is not None and max_seq_len > limit:
        raise CheckpointError(f"max_seq_len {max_seq_len} is more than the model in {directory} can read: its "
                              f"position embeddings cover {limit} tokens ({path}); use {limit} or less")
