"""The CRF head: Viterbi equals PaddleNLP's decoder and brute force, the loss sees first pieces only."""
from __future__ import annotations

import itertools

import numpy as np
import paddle
import pytest

from pipeline.labels import IGNORE_INDEX
from pipeline.decoding import viterbi
from pipeline.heads import _first_pieces, attach_crf, token_loss


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


def test_crf_loss_is_paddlenlps_on_the_first_pieces_only():
    from paddlenlp.layers import LinearChainCrfLoss

    model = paddle.nn.Layer()
    model.config = type("Config", (), {})()
    attach_crf(model, 3)
    model.crf.transitions.set_value(paddle.randn([3, 3]))
    logits = paddle.randn([1, 5, 3])
    labels = paddle.to_tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 0, IGNORE_INDEX]])
    expected = LinearChainCrfLoss(model.crf)(logits[:, [1, 3]], paddle.to_tensor([2]), paddle.to_tensor([[2, 0]]))
    np.testing.assert_allclose(float(token_loss(model, logits, labels)), float(expected.mean()), rtol=1e-5)
    # Changing what sits at ignored positions changes nothing.
    shifted = logits.numpy()
    shifted[0, [0, 2, 4]] += 100
    np.testing.assert_allclose(float(token_loss(model, paddle.to_tensor(shifted), labels)),
                               float(expected.mean()), rtol=1e-5)
