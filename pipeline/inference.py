"""Inference: the labelling engine shared by evaluation and prediction, and the Predictor.

Evaluation on dev/test and ``predict.py`` run the same code path, so the F1
reported during training is the F1 of what users get back. Only the step that
turns a padded ``[batch, seq]`` int64 array into label ids is pluggable: the
dynamic graph (``DynamicEngine``, what training evaluates with) or a static
model exported by ``python -m pipeline.export`` run by Paddle Inference
(``StaticEngine``); windowing, batching and merging are the same code for both.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from .data import Aligner, fill_tokens_without_pieces, pad_batch
from .labels import OUTSIDE, bio_spans
from .heads import decode_window, transitions_of
from .models import token_logits

WORD_PATTERN = re.compile(r"\S+")
ENGINES = ("auto", "dynamic", "static")
INFERENCE_DIR_NAME = "inference"


class DynamicEngine:
    """Logits of a padded batch from a dynamic-graph token classifier (``paddle.nn.Layer``)."""

    name = "dynamic"

    def __init__(self, model: paddle.nn.Layer):
        self.model = model

    @paddle.no_grad()
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""
        was_training = self.model.training
        self.model.eval()
        try:
            return token_logits(self.model, paddle.to_tensor(input_ids)).astype("float32").numpy()
        finally:
            if was_training:
                self.model.train()

    def transitions(self) -> np.ndarray | None:
        """The CRF's current transition scores, or None for the linear head (read anew: training moves them)."""
        return transitions_of(self.model)


def cpu_threads(environ=os.environ) -> int:
    """Threads for Paddle Inference's math library: what ``pipeline.cpu_env`` put in the environment."""
    for name in ("FLAGS_paddle_num_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            value = int(environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return 1


class StaticEngine:
    """Label ids of a padded batch from an exported static model, run by Paddle Inference.

    ``onednn`` (MKLDNN) and ``ir_optim`` are Paddle Inference's CPU options; the
    defaults are the combination measured fastest here that also gives the
    dynamic graph's labels exactly (see bench/predict_throughput.py).
    """

    name = "static"

    def __init__(self, inference_dir, use_gpu: bool = False, threads: int | None = None,
                 onednn: bool = False, ir_optim: bool = True, memory_optim: bool = False,
                 transitions: np.ndarray | None = None):
        from paddle import inference

        from .static_export import INPUT_NAME, model_files

        files = model_files(inference_dir)
        if files is None:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"no static model in {inference_dir}: run python -m pipeline.export first")
        self.inference_dir = Path(inference_dir)
        self._transitions = transitions  # the checkpoint's CRF transitions; None for the linear head
        self.options = {"onednn": onednn, "ir_optim": ir_optim, "memory_optim": memory_optim,
                        "threads": threads or cpu_threads(), "use_gpu": use_gpu}
        config = inference.Config(str(files[0]), str(files[1]))
        if use_gpu:
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(self.options["threads"])
            if onednn:
                config.enable_onednn()
                # Every new input shape is a oneDNN cache entry: bound it, since batch shapes vary.
                config.set_onednn_cache_capacity(64)
            else:
                config.disable_onednn()
        config.switch_ir_optim(ir_optim)
        if memory_optim:
            config.enable_memory_optim()
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.input = self.predictor.get_input_handle(INPUT_NAME)
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """``[batch, seq]`` int64 piece ids (padded with the tokenizer's pad id) -> ``[batch, seq, labels]``."""
        self.input.reshape(list(input_ids.shape))
        self.input.copy_from_cpu(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.predictor.run()
        return self.output.copy_to_cpu()

    def transitions(self) -> np.ndarray | None:
        return self._transitions


class TokenLabeller:
    """Labels token lists with a model: windows for long inputs, batches sorted by length.

    ``model`` is a dynamic-graph ``paddle.nn.Layer`` or an engine: any object with
    ``logits(input_ids [batch, seq] int64) -> [batch, seq, labels]`` and ``transitions()``
    (the CRF's, or None) (``DynamicEngine``, ``StaticEngine``). Label ids come from
    ``heads.decode_window``: argmax, or Viterbi over each token's first piece for a CRF.
    """

    def __init__(self, model, aligner: Aligner, labels: list[str], batch_size: int = 32,
                 overlap: int | None = None):
        self.engine = DynamicEngine(model) if isinstance(model, paddle.nn.Layer) else model
        self.model = getattr(self.engine, "model", None)  # the dynamic model, when there is one
        self.aligner = aligner
        self.labels = labels
        self.batch_size = batch_size
        # Windows share a quarter of their pieces, so every token is predicted with context on both sides.
        self.overlap = aligner.budget // 4 if overlap is None else overlap

    def _predict_windows(self, windows) -> list[np.ndarray]:
        """Label ids per window, running batches of similar length to keep padding low."""
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
        predictions: list[np.ndarray | None] = [None] * len(windows)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin: begin + self.batch_size]
            input_ids = pad_batch([np.asarray(windows[i].input_ids) for i in chunk], self.aligner.pad_id)
            logits = self.engine.logits(input_ids)
            transitions = self.engine.transitions()
            for row, index in enumerate(chunk):
                window = windows[index]
                predictions[index] = decode_window(logits[row, : len(window.input_ids)], window.first_positions,
                                                   transitions)
        return predictions

    def label(self, token_lists: list[list[str]]) -> list[list[str]]:
        """One BIO label per token of each list, in the order given."""
        windows, owners = [], []
        for sentence, tokens in enumerate(token_lists):
            for window in self.aligner.windows(tokens, overlap=self.overlap):
                windows.append(window)
                owners.append(sentence)
        window_labels = self._predict_windows(windows)
        results = [[OUTSIDE] * len(tokens) for tokens in token_lists]
        # How far each token's chosen prediction was from its window's edge; the most central wins.
        margins = [[-1] * len(tokens) for tokens in token_lists]
        has_pieces = [[False] * len(tokens) for tokens in token_lists]
        for window, sentence, ids in zip(windows, owners, window_labels):
            width = window.end - window.start
            for offset, position in enumerate(window.first_positions):
                if position < 0:
                    continue
                token = window.start + offset
                margin = min(offset, width - 1 - offset)
                if margin > margins[sentence][token]:
                    margins[sentence][token] = margin
                    results[sentence][token] = self.labels[int(ids[position])]
                    has_pieces[sentence][token] = True
        return [fill_tokens_without_pieces(r, h) for r, h in zip(results, has_pieces)]


@dataclass
class TextUnits:
    """How a raw text was cut into model tokens, with each token's character offsets."""

    tokens: list[str]
    offsets: list[tuple[int, int]]


def split_text(text: str, text_unit: str) -> TextUnits:
    """Cut text into tokens: every character ('char') or every run of non-space ('word')."""
    if text_unit == "char":
        return TextUnits(list(text), [(i, i + 1) for i in range(len(text))])
    matches = list(WORD_PATTERN.finditer(text))
    return TextUnits([m.group() for m in matches], [m.span() for m in matches])


def character_labels(text: str, units: TextUnits, token_labels: list[str]) -> list[str]:
    """Spread token labels over characters: one label per character of ``text``."""
    if len(units.offsets) == len(text) and all(end - start == 1 for start, end in units.offsets):
        return list(token_labels)
    labels = [OUTSIDE] * len(text)
    previous_end, previous_type = 0, None
    for (start, end), label in zip(units.offsets, token_labels):
        entity_type = None if label == OUTSIDE else label[2:]
        # Whitespace between two words of one entity belongs to the entity.
        if label.startswith("I-") and entity_type == previous_type:
            for gap in range(previous_end, start):
                labels[gap] = label
        labels[start] = label
        for inside in range(start + 1, end):
            labels[inside] = OUTSIDE if label == OUTSIDE else f"I-{entity_type}"
        previous_end, previous_type = end, entity_type
    return labels


def entities_of(text: str, labels: list[str]) -> list[dict]:
    """Entities as ``{"type", "start", "end", "text"}``; adjacent entities stay separate."""
    return [{"type": t, "start": s, "end": e, "text": text[s:e]} for t, s, e in bio_spans(labels)]


class Predictor:
    """Batch NER prediction from a saved checkpoint directory alone."""

    def __init__(self, labeller: TokenLabeller, text_unit: str):
        self.labeller = labeller
        self.text_unit = text_unit

    @classmethod
    def from_checkpoint(cls, directory, batch_size: int = 32, max_seq_len: int | None = None,
                        use_gpu: bool = False, engine: str = "auto", inference_dir=None,
                        static_options: dict | None = None) -> "Predictor":
        """Load tokenizer, label map and a model from ``directory`` (e.g. ``.../best_model``).

        ``engine``: ``"dynamic"`` runs the checkpoint's weights in the dynamic graph;
        ``"static"`` runs the static model exported by ``python -m pipeline.export``
        through Paddle Inference and fails (CheckpointError) if there is none or it
        was exported from other weights; ``"auto"`` uses the static model when one
        is found and current, else warns and runs the dynamic graph. The static
        model is looked for in ``inference_dir`` if given, else in
        ``directory/inference`` and then ``directory/../inference``. ``static_options``
        (``onednn``, ``ir_optim``, ``threads``...) go to ``StaticEngine``.
        """
        from .checkpoint import (CheckpointError, load_crf_transitions,  # checkpoint imports this module's users
                                 load_inference_bundle, load_tokenizer_and_meta)

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
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
            model = StaticEngine(static_dir, use_gpu=use_gpu, transitions=load_crf_transitions(directory),
                                 **(static_options or {}))
            labels, text_unit, trained_len = meta["labels"], meta["text_unit"], int(meta["max_seq_len"])
        else:
            bundle = load_inference_bundle(directory)
            model, tokenizer = bundle.model, bundle.tokenizer
            labels, text_unit, trained_len = bundle.labels, bundle.text_unit, bundle.max_seq_len
        aligner = Aligner(tokenizer, max_seq_len or trained_len)
        return cls(TokenLabeller(model, aligner, labels, batch_size), text_unit)

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
