"""Inference: the labelling engine shared by evaluation and prediction, and the Predictor.

Evaluation on dev/test and ``predict.py`` run the same code path, so the F1
reported during training is the F1 of what users get back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import paddle

from .data import Aligner, fill_tokens_without_pieces, pad_batch
from .labels import OUTSIDE, bio_spans
from .models import token_logits

WORD_PATTERN = re.compile(r"\S+")


class TokenLabeller:
    """Labels token lists with a model: windows for long inputs, batches sorted by length."""

    def __init__(self, model: paddle.nn.Layer, aligner: Aligner, labels: list[str], batch_size: int = 32,
                 overlap: int | None = None):
        self.model = model
        self.aligner = aligner
        self.labels = labels
        self.batch_size = batch_size
        # Windows share a quarter of their pieces, so every token is predicted with context on both sides.
        self.overlap = aligner.budget // 4 if overlap is None else overlap

    @paddle.no_grad()
    def _predict_windows(self, windows) -> list[np.ndarray]:
        """Label ids per window, running batches of similar length to keep padding low."""
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
        predictions: list[np.ndarray | None] = [None] * len(windows)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin: begin + self.batch_size]
            input_ids = pad_batch([np.asarray(windows[i].input_ids) for i in chunk], self.aligner.pad_id)
            logits = token_logits(self.model, paddle.to_tensor(input_ids))
            label_ids = paddle.argmax(logits, axis=-1).numpy()
            for row, index in enumerate(chunk):
                predictions[index] = label_ids[row, : len(windows[index].input_ids)]
        if was_training:
            self.model.train()
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
                        use_gpu: bool = False) -> "Predictor":
        """Load weights, tokenizer and label map from ``directory`` (e.g. ``.../best_model``)."""
        from .checkpoint import load_inference_bundle  # checkpoint imports this module's users

        paddle.set_device("gpu" if use_gpu else "cpu")
        bundle = load_inference_bundle(directory)
        aligner = Aligner(bundle.tokenizer, max_seq_len or bundle.max_seq_len)
        return cls(TokenLabeller(bundle.model, aligner, bundle.labels, batch_size), bundle.text_unit)

    def predict(self, texts: list[str]) -> list[dict]:
        """One result per text, in order: ``{"text", "labels", "entities"}``."""
        units = [split_text(text, self.text_unit) for text in texts]
        token_labels = self.labeller.label([u.tokens for u in units])
        results = []
        for text, unit, labels in zip(texts, units, token_labels):
            per_character = character_labels(text, unit, labels)
            results.append({"text": text, "labels": per_character, "entities": entities_of(text, per_character)})
        return results
