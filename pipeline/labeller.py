"""Windowed labelling: BIO labels for token lists, the code shared by evaluation and prediction.

Evaluation on dev/test and ``predict.py`` both label through ``TokenLabeller``,
so the F1 reported during training is the F1 of what users get back. Only the
engine that computes logits differs (``pipeline.engines``); windowing,
batching, decoding and merging are this module's, the same for every engine.
"""
from __future__ import annotations

import numpy as np

from .alignment import Aligner, fill_tokens_without_pieces
from .collate import pad_batch
from .engines import Engine
from .heads import decode_window
from .labels import OUTSIDE


class TokenLabeller:
    """Labels token lists with an engine: windows for long inputs, batches sorted by length.

    ``engine``: any object with ``logits(input_ids [batch, seq] int64) -> [batch, seq, labels]``
    and ``transitions()`` (the CRF's, or None), e.g. ``DynamicEngine(model)`` or
    ``StaticEngine``. Label ids come from ``heads.decode_window``: argmax, or
    Viterbi over each token's first piece for a CRF.
    """

    def __init__(self, engine: Engine, aligner: Aligner, labels: list[str], batch_size: int = 32,
                 overlap: int | None = None):
        if not callable(getattr(engine, "logits", None)) or not callable(getattr(engine, "transitions", None)):
            raise TypeError(f"TokenLabeller needs an engine with logits() and transitions(), got "
                            f"{type(engine).__name__} (wrap a paddle.nn.Layer in pipeline.engines.DynamicEngine)")
        self.engine = engine
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
