"""The CRF head: Viterbi equals PaddleNLP's decoder and brute force; the loss is the negative log-likelihood
over every path (brute force), on first pieces only."""
from __future__ import annotations

import itertools

import numpy as np
import paddle
import pytest

from pipeline.labels import IGNORE_INDEX
from pipeline.decoding import viterbi
from pipeline.heads import _first_pieces, attach_crf, log_partition, token_loss


def brute_force(emissions, transitions):
    steps, labels = emissions.shape
    best = max(itertools.product(range(labels), repeat=steps),
               key=lambda path: emissions[np.arange(steps), path].sum()
               + sum(transitions[a, b] for a, b in zip(path, path[1:])))
    return np.array(best)


@pytest.mark.parametrize("seed", range(20))
def test_viterbi_finds_the_best_path(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(1, 6))
    emissions, transitions = rng.normal(size=(steps, 3)), rng.normal(size=(3, 3)) * 2
    assert viterbi(emissions, transitions).tolist() == brute_force(emissions, transitions).tolist()


def test_viterbi_agrees_with_paddlenlp_decoder():
    from paddlenlp.layers import ViterbiDecoder

    rng = np.random.default_rng(0)
    transitions = rng.normal(size=(7, 7)).astype("float32")
    emissions = rng.normal(size=(5, 12, 7)).astype("float32")
    lengths = np.array([12, 1, 7, 3, 12])
    decoder = ViterbiDecoder(paddle.to_tensor(transitions), with_start_stop_tag=False)
    _, paths = decoder(paddle.to_tensor(emissions), paddle.to_tensor(lengths))
    for row, length in enumerate(lengths):
        ours = viterbi(emissions[row, :length], transitions)
        assert ours.tolist() == paths.numpy()[row, :length].tolist()


def test_first_pieces_are_moved_to_the_front_in_order():
    logits = paddle.arange(2 * 6 * 2, dtype="float32").reshape([2, 6, 2])
    labels = paddle.to_tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 0, 1, IGNORE_INDEX],
                               [IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    emissions, compact, lengths = _first_pieces(logits, labels)
    assert lengths.numpy().tolist() == [3, 1]
    assert compact.numpy()[0].tolist() == [1, 0, 1] and compact.numpy()[1, 0] == 0
    np.testing.assert_array_equal(emissions.numpy()[0], logits.numpy()[0, [1, 3, 4]])
    np.testing.assert_array_equal(emissions.numpy()[1, 0], logits.numpy()[1, 1])


def brute_force_nll(emissions, transitions, gold):
    """-log p(gold): the gold path's score against the log-sum-exp of every path's, transitions [previous, next]."""
    steps, labels = emissions.shape

    def score(path):
        return emissions[np.arange(steps), path].sum() + sum(transitions[a, b] for a, b in zip(path, path[1:]))

    scores = np.array([score(path) for path in itertools.product(range(labels), repeat=steps)], dtype=np.float64)
    top = scores.max()
    return top + np.log(np.exp(scores - top).sum()) - score(list(gold))


def crf_model(labels: int, seed: int):
    model = paddle.nn.Layer()
    model.config = type("Config", (), {})()
    attach_crf(model, labels)
    model.crf.transitions.set_value(paddle.to_tensor(np.random.default_rng(seed).normal(size=(labels, labels)) * 2,
                                                     dtype="float32"))
    return model


@pytest.mark.parametrize("seed", range(6))
def test_log_partition_sums_every_path_with_transitions_read_previous_to_next(seed):
    rng = np.random.default_rng(seed)
    transitions = rng.normal(size=(3, 3)) * 2  # far from symmetric: a transposed reading gives another sum
    emissions = rng.normal(size=(4, 5, 3))
    lengths = np.array([5, 1, 3, 4])
    ours = log_partition(paddle.to_tensor(emissions, dtype="float32"), paddle.to_tensor(transitions, dtype="float32"),
                         paddle.to_tensor(lengths)).numpy()
    for row, length in enumerate(lengths):
        gold = [0] * length  # any path: nll + its score = log Z
        expected = brute_force_nll(emissions[row, :length], transitions, gold) + (
            emissions[row, np.arange(length), gold].sum() + transitions[0, 0] * (length - 1))
        assert ours[row] == pytest.approx(expected, rel=1e-5), (row, length)


def test_paddlenlps_crf_loss_reads_its_transitions_backwards_and_ours_does_not():
    """Why token_loss does not use LinearChainCrfLoss: PaddleNLP 2.8.1's partition function uses
    transitions[next, previous] against its gold score's [previous, next]."""
    from paddlenlp.layers import LinearChainCrfLoss

    model = crf_model(3, seed=4)
    transitions = model.crf.transitions.numpy().astype(np.float64)
    rng = np.random.default_rng(1)
    emissions = rng.normal(size=(1, 4, 3)).astype("float32")
    gold = [0, 2, 1, 1]
    expected = brute_force_nll(emissions[0].astype(np.float64), transitions, gold)
    theirs = float(LinearChainCrfLoss(model.crf)(paddle.to_tensor(emissions), paddle.to_tensor([4]),
                                                paddle.to_tensor([gold])).mean())
    assert theirs != pytest.approx(expected, abs=1e-3)
    assert theirs == pytest.approx(brute_force_nll(emissions[0].astype(np.float64), transitions.T, gold)
                                   + _transposed_gold_gap(emissions[0], transitions, gold), rel=1e-4)
    labels = paddle.to_tensor([gold])
    assert float(token_loss(model, paddle.to_tensor(emissions), labels)) == pytest.approx(expected, rel=1e-5)


def _transposed_gold_gap(emissions, transitions, gold):
    """PaddleNLP's loss is log Z(transitions transposed) - gold score(transitions): the gap between the gold
    path's score read both ways."""
    forward = sum(transitions[a, b] for a, b in zip(gold, gold[1:]))
    backward = sum(transitions[b, a] for a, b in zip(gold, gold[1:]))
    return backward - forward


@pytest.mark.parametrize("seed", range(4))
def test_crf_loss_is_the_negative_log_likelihood_of_the_first_pieces_only(seed):
    model = crf_model(3, seed)
    transitions = model.crf.transitions.numpy().astype(np.float64)
    rng = np.random.default_rng(10 + seed)
    logits = rng.normal(size=(2, 6, 3)).astype("float32")
    labels = np.array([[IGNORE_INDEX, 2, IGNORE_INDEX, 0, 1, IGNORE_INDEX],
                       [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    expected = np.mean([brute_force_nll(logits[0, [1, 3, 4]].astype(np.float64), transitions, [2, 0, 1]),
                        brute_force_nll(logits[1, [1]].astype(np.float64), transitions, [1])])
    loss = token_loss(model, paddle.to_tensor(logits), paddle.to_tensor(labels))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Changing what sits at ignored positions changes nothing.
    shifted = logits.copy()
    shifted[0, [0, 2, 5]] += 100
    assert float(token_loss(model, paddle.to_tensor(shifted), paddle.to_tensor(labels))) == pytest.approx(expected,
                                                                                                       rel=1e-5)
    # The gradient reaches the transitions and the emissions.
    loss.backward()
    assert float(np.abs(model.crf.transitions.grad.numpy()).sum()) > 0
