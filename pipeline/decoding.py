"""Decoding: one label id per token from a sentence's stitched per-token scores, valid strict BIO by construction.

``constrained`` (the default) runs Viterbi over the tokens with the moves strict
IOB2 forbids set to -inf: ``O -> I-X``, ``B-X/I-X -> I-Y`` for ``Y != X`` and a
sentence that starts with ``I-X``. For the linear head the scores are the
per-token log-probabilities (log-softmax of the logits), so the result is the
most probable valid sequence; for the CRF head they are its emissions plus its
learnt transitions, with the same moves forbidden. ``argmax`` is the model's
unconstrained decoding, as before this module existed: per-token argmax for the
linear head, Viterbi over the learnt transitions alone for the CRF; it can emit
an ``I-X`` that opens no entity.

Viterbi is hand-written in NumPy, not PaddleNLP's ViterbiDecoder: decoding runs
on NumPy logits after either engine, the static Paddle Inference one included
(its exported program ends at the emissions; the CRF's transitions come from the
checkpoint), over a whole sentence stitched from several windows. The same NumPy
code for every engine is what makes their labels identical.
"""
from __future__ import annotations

import numpy as np

from .labels import OUTSIDE, split_tag

DECODINGS = ("constrained", "argmax")


def allowed_transitions(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(start [L], moves [previous, next])`` booleans: which labels strict BIO lets open a sentence or follow."""
    parts = [split_tag(label) for label in labels]
    # I-X may only continue a span of type X; every other label may go anywhere.
    start = np.array([prefix != "I" for prefix, _ in parts])
    moves = np.array([[prefix != "I" or (before_prefix != OUTSIDE and before_type == entity_type)
                       for prefix, entity_type in parts] for before_prefix, before_type in parts])
    return start, moves


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Per-row log-probabilities of ``[T, L]`` logits, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def viterbi(emissions: np.ndarray, transitions: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Best label sequence under emission scores ``[T, L]``, transitions ``[previous, next]`` and
    optional start scores ``[L]`` (-inf entries are moves that are never taken)."""
    steps = emissions.shape[0]
    if steps == 0:
        return np.zeros(0, dtype=np.int64)
    score = emissions[0].astype(np.float64) + (0.0 if start is None else start)
    back = np.zeros((steps, emissions.shape[1]), dtype=np.int64)
    for t in range(1, steps):
        candidates = score[:, None] + transitions  # [previous, next]
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + emissions[t]
    path = np.empty(steps, dtype=np.int64)
    path[-1] = int(score.argmax())
    for t in range(steps - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


class SequenceDecoder:
    """Label ids of one sentence's tokens from their scores ``[T, L]`` (logits, or a CRF's emissions)."""

    def __init__(self, labels: list[str], decoding: str = "constrained"):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {list(DECODINGS)}, got {decoding!r}")
        self.decoding = decoding
        self.start_allowed, self.moves_allowed = allowed_transitions(labels)
        self.start_scores = np.where(self.start_allowed, 0.0, -np.inf)
        self.forbidden_moves = np.where(self.moves_allowed, 0.0, -np.inf)

    def is_valid(self, ids: np.ndarray) -> bool:
        """Whether a label-id sequence is strict BIO."""
        return len(ids) == 0 or bool(self.start_allowed[ids[0]] and self.moves_allowed[ids[:-1], ids[1:]].all())

    def decode(self, scores: np.ndarray, transitions: np.ndarray | None = None) -> np.ndarray:
        """Label id per token; ``transitions`` are the CRF's ``[previous, next]`` (None for the linear head)."""
        if transitions is None:
            ids = scores.argmax(axis=-1)
            # The unconstrained optimum is the constrained one whenever it is valid: most sentences of a
            # trained model, decoded without the Viterbi loop.
            if self.decoding == "argmax" or self.is_valid(ids):
                return ids
            return viterbi(log_softmax(scores), self.forbidden_moves, self.start_scores)
        if self.decoding == "argmax":
            return viterbi(scores, transitions)
        return viterbi(scores, transitions + self.forbidden_moves, self.start_scores)
