"""Gradient norm and clipping: the trainer's one-norm clipping equals Paddle's ClipGradByGlobalNorm."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from pipeline.optim import clip_grads_, global_grad_norm


def two_layer_net(seed: int) -> paddle.nn.Layer:
    paddle.seed(seed)
    return paddle.nn.Sequential(paddle.nn.Linear(6, 5), paddle.nn.Tanh(), paddle.nn.Linear(5, 3))


def backward_once(net: paddle.nn.Layer, scale: float) -> None:
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(4, 6)).astype("float32"))
    (net(x).sum() * scale).backward()


def gradients(net) -> list[np.ndarray]:
    return [p.grad.numpy().copy() for p in net.parameters()]


def test_global_norm_is_the_l2_norm_of_all_gradients_together():
    net = two_layer_net(1)
    backward_once(net, scale=3.0)
    expected = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in gradients(net)))
    assert float(global_grad_norm(net.parameters())) == pytest.approx(expected, rel=1e-5)
    assert float(global_grad_norm(two_layer_net(2).parameters())) == 0.0  # no gradients yet


@pytest.mark.parametrize("scale", [float("nan"), 1e38])  # NaN gradients; gradients that overflow to Inf
def test_a_nan_or_inf_gradient_makes_the_norm_non_finite(scale):
    net = two_layer_net(1)
    backward_once(net, scale=scale)
    assert not all(np.isfinite(g).all() for g in gradients(net))
    assert not math.isfinite(float(global_grad_norm(net.parameters())))


@pytest.mark.parametrize("skip_unclipped", [True, False])  # CPU: read the norm; GPU: a factor on the device
@pytest.mark.parametrize("scale, max_norm", [(50.0, 1.0), (0.01, 1.0)])
def test_clipping_matches_paddles_global_norm_clip_after_an_adamw_step(scale, max_norm, skip_unclipped):
    ours, theirs = two_layer_net(3), two_layer_net(3)
    for net in (ours, theirs):
        backward_once(net, scale)
    norm = global_grad_norm(ours.parameters())
    clipped = clip_grads_(ours.parameters(), max_norm, norm, skip_unclipped)
    assert clipped == (float(norm) > max_norm or not skip_unclipped)
    if float(norm) > max_norm:
        assert float(global_grad_norm(ours.parameters())) == pytest.approx(max_norm, rel=1e-5)
    paddle.optimizer.AdamW(learning_rate=0.1, parameters=ours.parameters()).step()
    paddle.optimizer.AdamW(learning_rate=0.1, parameters=theirs.parameters(),
                           grad_clip=paddle.nn.ClipGradByGlobalNorm(max_norm)).step()
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-7)


def test_small_gradients_are_left_untouched_and_zero_max_norm_disables_clipping():
    net = two_layer_net(4)
    backward_once(net, scale=0.01)
    before = gradients(net)
    assert not clip_grads_(net.parameters(), 1.0, global_grad_norm(net.parameters()))
    net2 = two_layer_net(4)
    backward_once(net2, scale=100.0)
    big = gradients(net2)
    assert not clip_grads_(net2.parameters(), 0.0, global_grad_norm(net2.parameters()))
    for kept, original in zip(gradients(net) + gradients(net2), before + big):
        np.testing.assert_array_equal(kept, original)
