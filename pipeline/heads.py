"""Token-classification heads: the linear softmax head and a linear-chain CRF on top of it.

The CRF (PaddleNLP's ``LinearChainCrf``) scores label transitions over the
tokens of a sentence, i.e. over the first word piece of each token; continuation
pieces and special tokens are left out, exactly as they are left out of the
softmax loss (``IGNORE_INDEX``). It is attached to the PaddleNLP model as
``model.crf``, so the encoder's and the linear layer's weight names do not
change and the checkpoint stays one ``model.pdparams``; ``config.json``
records ``ner_head: crf`` so that a checkpoint rebuilds its own head.
Decoding (Viterbi over the learnt transitions, with the moves strict BIO forbids
removed) is ``pipeline.decoding``'s, the same code as the linear head's.

The loss is ours, not ``LinearChainCrfLoss``: PaddleNLP 2.8.1's ``LinearChainCrf.forward``
(the log partition function) indexes the transitions ``[next, previous]`` while its
``gold_score`` (and every Viterbi) reads them ``[previous, next]``, so its "negative
log-likelihood" is not one, and training learns transitions that decoding then misreads
(checked against brute force over all paths: ``tests/test_heads.py``). ``log_partition`` is
the forward algorithm with the gold score's orientation.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from .labels import IGNORE_INDEX

# PaddleNLP's ERNIE-CRF multiplies the transitions' learning rate by 100: they start at zero
# and would otherwise barely move at a fine-tuning learning rate.
CRF_LEARNING_RATE_MULTIPLIER = 100.0


def attach_crf(model, num_labels: int) -> None:
    """Give ``model`` a CRF over its ``num_labels`` classes and record that in its config."""
    from paddlenlp.layers import LinearChainCrf

    model.crf = LinearChainCrf(num_labels, crf_lr=CRF_LEARNING_RATE_MULTIPLIER, with_start_stop_tag=False)
    model.config.ner_head = "crf"


def head_of(model) -> str:
    """'crf' if a CRF is attached to ``model``, else 'linear'."""
    return "crf" if getattr(model, "crf", None) is not None else "linear"


def _first_pieces(logits, label_ids):
    """Move every row's labelled positions to the front, in order: ``(emissions, labels, lengths)``."""
    mask = label_ids != IGNORE_INDEX
    lengths = mask.astype("int64").sum(axis=1)
    seq_len = label_ids.shape[1]
    positions = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
    # Labelled positions keep their index, the others sort after every labelled one.
    order = paddle.argsort(paddle.where(mask, positions, positions + seq_len), axis=1)
    longest = max(int(lengths.max()), 1)
    order = order[:, :longest]
    emissions = paddle.take_along_axis(logits, order.unsqueeze(-1).expand([-1, -1, logits.shape[-1]]), axis=1)
    labels = paddle.take_along_axis(label_ids, order, axis=1)
    labels = paddle.where(labels == IGNORE_INDEX, paddle.zeros_like(labels), labels)
    return emissions, labels, lengths


def log_partition(emissions, transitions, lengths):
    """``log Z`` per row: the log-sum-exp, over every label path ``y`` of the row's first ``lengths``
    positions, of ``sum_t emissions[t, y_t] + sum_t transitions[y_(t-1), y_t]`` (the forward algorithm;
    ``transitions`` is ``[previous, next]``, as the gold score and Viterbi read it). Lengths >= 1."""
    alpha = emissions[:, 0]  # [batch, labels]: paths ending in each label at position 0
    for t in range(1, emissions.shape[1]):
        # [batch, previous, 1] + [1, previous, next] -> log-sum-exp over previous
        step = paddle.logsumexp(alpha.unsqueeze(2) + transitions.unsqueeze(0), axis=1) + emissions[:, t]
        alpha = paddle.where((lengths > t).unsqueeze(1), step, alpha)  # rows already ended keep theirs
    return paddle.logsumexp(alpha, axis=1)


def token_loss(model, logits, label_ids):
    """Mean loss of a batch: cross-entropy per labelled token, or CRF negative log-likelihood per window."""
    logits = logits.astype("float32")
    if head_of(model) == "linear":
        return F.cross_entropy(logits.reshape([-1, logits.shape[-1]]), label_ids.reshape([-1]),
                               ignore_index=IGNORE_INDEX)
    emissions, labels, lengths = _first_pieces(logits, label_ids)
    has_tokens = (lengths > 0).astype("float32")  # a window of pieceless characters has nothing to score
    lengths = paddle.clip(lengths, min=1)
    transitions = model.crf.transitions.astype("float32")
    losses = log_partition(emissions, transitions, lengths) - model.crf.gold_score(emissions, labels, lengths)
    return (losses * has_tokens).sum() / paddle.clip(has_tokens.sum(), min=1.0)


def transitions_of(model) -> np.ndarray | None:
    """The CRF's transition scores ``[previous, next]``, or None for the linear head."""
    return model.crf.transitions.numpy().astype("float32") if head_of(model) == "crf" else None
