"""Dropout with integer-drawn masks: Paddle's drop probability and scaling, its gradient, seeding, and where it runs."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle.nn.layer import transformer as paddle_transformer

from helpers import every_layer_runs, make_trainer
from pipeline import dropout_masks
from pipeline.dropout_masks import install_dropout_masks_from_integers, uninstall_from_attention
from pipeline.models import build_token_classifier, resolve_model

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(autouse=True)
def _attention_restored():
    yield
    uninstall_from_attention()


def test_elements_are_dropped_with_probability_p_and_the_rest_scaled_as_paddle_does():
    paddle.seed(1)
    x = paddle.ones([64, 128, 64])  # 524,288 elements: the dropped share is p within 0.002 (5 sigma at p=0.3)
    for p in (0.1, 0.3):
        y = dropout_masks.dropout(x, p=p).numpy()
        assert set(np.unique(y).tolist()) == {0.0, np.float32(1.0) * np.float32(1 / (1 - p))}
        assert abs((y == 0).mean() - p) < 0.002, (p, (y == 0).mean())
        # Paddle's own kernel, same input: the same two values
        assert set(np.unique(F.dropout(x, p=p).numpy()).tolist()) == set(np.unique(y).tolist())


def test_the_gradient_is_the_output_gradient_times_the_same_scaled_mask():
    paddle.seed(2)
    x = paddle.rand([8, 16, 32]) + 0.5  # no zeros, so the mask can be read off the output
    x.stop_gradient = False
    upstream = paddle.randn([8, 16, 32])
    y = dropout_masks.dropout(x, p=0.2)
    (grad,) = paddle.grad([y], [x], [upstream])
    scaled_mask = y.numpy() / x.numpy()
    np.testing.assert_allclose(grad.numpy(), upstream.numpy() * scaled_mask, rtol=1e-6)
    assert 0 < (scaled_mask == 0).mean() < 1


def test_masks_follow_paddles_seed_and_change_from_call_to_call():
    x = paddle.ones([32, 64])

    def two_masks(seed):
        paddle.seed(seed)
        return dropout_masks.dropout(x, p=0.5).numpy(), dropout_masks.dropout(x, p=0.5).numpy()

    first, second = two_masks(7)
    again_first, again_second = two_masks(7)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    assert (first != second).any()
    assert (two_masks(8)[0] != first).any()


@pytest.mark.parametrize("call", [
    dict(training=False),  # evaluation: the input itself
    dict(p=0.0), dict(p=1.0), dict(axis=1), dict(mode="downscale_in_infer"),
])
def test_what_it_does_not_cover_goes_to_paddles_own_dropout(call):
    x = paddle.rand([4, 6]) + 0.5
    kwargs = dict(dict(p=0.5), **call)
    paddle.seed(3)
    expected = F.dropout(x, **kwargs).numpy()
    paddle.seed(3)
    np.testing.assert_array_equal(dropout_masks.dropout(x, **kwargs).numpy(), expected)


def test_every_dropout_of_a_token_classifier_uses_it_attention_included(tiny_model_dir, monkeypatch):
    calls = []
    own = dropout_masks.dropout

    def counting(x, p=0.5, **kwargs):
        calls.append((tuple(x.shape), p))
        return own(x, p, **kwargs)

    monkeypatch.setattr(dropout_masks, "dropout", counting)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), LABELS)
    layers = install_dropout_masks_from_integers(model)
    model.train()
    model(paddle.randint(5, 60, [3, 7]))
    # Layers: embeddings, head, and per encoder layer the dropouts after attention, after the feed-forward and
    # inside it (PaddleNLP's BERT builds that one with p=0: Paddle's own function returns its input).
    assert layers == 2 + 2 * 3
    assert len(calls) == layers + 2, calls  # + the attention weights' dropout of each encoder layer
    assert sorted(p for _, p in calls) == [0] * 2 + [0.1] * 8
    attention = [shape for shape, _ in calls if len(shape) == 4]
    assert attention == [(3, 2, 7, 7)] * 2  # [batch, heads, tokens, tokens], once per layer
    uninstall_from_attention()
    assert paddle_transformer.F is F


@pytest.mark.parametrize("static", [False, True], ids=["eager", "to_static"])
def test_a_model_trains_through_it_eager_and_to_static_with_varying_shapes(tiny_model_dir, static):
    paddle.seed(4)
    model = build_token_classifier(resolve_model(str(tiny_model_dir)), LABELS)
    install_dropout_masks_from_integers(model)
    model.train()

    def loss_of(ids, gold):
        logits = model(ids)
        return F.cross_entropy(logits.reshape([-1, len(LABELS)]), gold.reshape([-1]))

    step = paddle.jit.to_static(loss_of, full_graph=False) if static else loss_of
    for length in (5, 9, 6):
        ids = paddle.randint(5, 60, [4, length])
        loss = step(ids, paddle.randint(0, len(LABELS), [4, length]))
        loss.backward()
        assert np.isfinite(float(loss))
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        assert grads and all(bool(paddle.isfinite(g).all()) for g in grads)
        model.clear_gradients()
    # train mode draws masks: two forwards of one batch differ; eval mode does not drop anything
    ids = paddle.randint(5, 60, [2, 6])
    assert not np.array_equal(model(ids).numpy(), model(ids).numpy())
    model.eval()
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())


def _uses_it(model) -> bool:
    return every_layer_runs(model, paddle.nn.Dropout, dropout_masks._dropout_layer_forward)


def test_the_trainer_uses_it_on_cpu_float32_only_when_asked(tiny_model_dir, tiny_dataset_dir, tmp_path):
    on = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "on", max_steps=2, do_test=False)
    on.fit()
    assert _uses_it(on.model) and paddle_transformer.F.dropout is dropout_masks.dropout
    off = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "off", max_steps=2, do_test=False,
                       dropout_masks_from_integers=False)
    off.fit()
    assert not _uses_it(off.model) and paddle_transformer.F is F  # the first trainer's swap undone
    bf16 = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "bf16", max_steps=1, do_test=False, amp="bf16")
    bf16.fit()
    assert not _uses_it(bf16.model) and paddle_transformer.F is F
