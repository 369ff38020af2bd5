"""Windowed labelling: BIO labels for token lists, the code shared by evaluation and prediction.

Evaluation on dev/test and ``predict.py`` both label through ``TokenLabeller``,
so the F1 reported during training is the F1 of what users get back. Only the
engine that computes logits differs (``pipeline.engines``); windowing,
batching, stitching, decoding and filling are this module's, the same for every engine.
"""
from __future__ import annotations

import numpy as np

from .alignment import Aligner, fill_tokens_without_pieces
from .collate import pad_batch
from .decoding import SequenceDecoder
from .engines import Engine
from .labels import OUTSIDE


class TokenLabeller:
    """Labels token lists with an engine: windows for long inputs, batches sorted by length.

    ``engine``: any object with ``logits(input_ids [batch, seq] int64) -> [batch, seq, labels]``
    and ``transitions()`` (the CRF's, or None), e.g. ``DynamicEngine(model)`` or
    ``StaticEngine``. Each token's logits come from its most central window; a whole
    sentence is then decoded at once by ``decoding.SequenceDecoder`` (``decoding``:
    ``constrained``, valid strict BIO, or ``argmax``), so window joins are decoded too.
    """

    def __init__(self, engine: Engine, aligner: Aligner, labels: list[str], batch_size: int = 32,
                 overlap: int | None = None, decoding: str = "constrained"):
        if not callable(getattr(engine, "logits", None)) or not callable(getattr(engine, "transitions", None)):
            raise TypeError(f"TokenLabeller needs an engine with logits() and transitions(), got "
                            f"{type(engine).__name__} (wrap a paddle.nn.Layer in pipeline.engines.DynamicEngine)")
        self.engine = engine
        self.aligner = aligner
        self.labels = labels
        self.batch_size = batch_size
        self.decoder = SequenceDecoder(labels, decoding)
        # Windows share a quarter of their pieces, so every token is predicted with context on both sides.
        self.overlap = aligner.budget // 4 if overlap is None else overlap

    @property
    def decoding(self) -> str:
        """``constrained`` or ``argmax``: how stitched scores become labels."""
        return self.decoder.decoding

    def _window_logits(self, windows) -> list[np.ndarray]:
        """Logits ``[pieces, labels]`` per window, running batches of similar length to keep padding low."""
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
        results: list[np.ndarray | None] = [None] * len(windows)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin: begin + self.batch_size]
            input_ids = pad_batch([np.asarray(windows[i].input_ids) for i in chunk], self.aligner.pad_id)
            logits = self.engine.logits(input_ids)
            for row, index in enumerate(chunk):
                results[index] = logits[row, : len(windows[index].input_ids)]
        return results

    def label(self, token_lists: list[list[str]]) -> list[list[str]]:
        """One BIO label per token of each list, in the order given."""
        windows, owners = [], []
        for sentence, tokens in enumerate(token_lists):
            for window in self.aligner.windows(tokens, overlap=self.overlap):
                windows.append(window)
                owners.append(sentence)
        window_logits = self._window_logits(windows)
        transitions = self.engine.transitions()  # read once per call: training moves a CRF's transitions
        scores = [np.zeros((len(tokens), len(self.labels)), dtype=np.float32) for tokens in token_lists]
        # How far each token's chosen logits were from their window's edge; the most central wins.
        margins = [[-1] * len(tokens) for tokens in token_lists]
        has_pieces = [[False] * len(tokens) for tokens in token_lists]
        for window, sentence, logits in zip(windows, owners, window_logits):
            width = window.end - window.start
            for offset, position in enumerate(window.first_positions):
                if position < 0:
                    continue
                token = window.start + offset
                margin = min(offset, width - 1 - offset)
                if margin > margins[sentence][token]:
                    margins[sentence][token] = margin
                    scores[sentence][token] = logits[position]
                    has_pieces[sentence][token] = True
        return [self._decode(s, h, transitions) for s, h in zip(scores, has_pieces)]

    def _decode(self, scores: np.ndarray, has_pieces: list[bool], transitions) -> list[str]:
        """One sentence's labels from its stitched scores.

        Only tokens with pieces are decoded, as one sequence: the model never saw the others, and the
        CRF was trained on exactly this sequence (its transitions link consecutive first pieces). Tokens
        without pieces are then filled from their neighbours: ``I-X`` inside an ``X`` span, else ``O``.
        A valid decoded sequence stays valid: a filled ``O`` is never followed by an ``I-`` (that ``I-``
        would continue a span, which makes the filled token ``I-`` too), and one before the first
        decoded token precedes a label that may open a sentence.
        """
        seen = np.flatnonzero(has_pieces)
        labels = [OUTSIDE] * len(has_pieces)
        for token, label_id in zip(seen, self.decoder.decode(scores[seen], transitions)):
            labels[token] = self.labels[int(label_id)]
        return fill_tokens_without_pieces(labels, has_pieces)
