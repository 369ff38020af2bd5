"""Gradient norm and clipping: the trainer's one-norm clipping equals Paddle's ClipGradByGlobalNorm."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from pipeline.optim import clip_grads_, global_grad_norm, layer_lr_multipliers


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


# ---------------------------------------------------------------- layer-wise learning-rate decay


def tiny_classifier(tiny_model_dir, head="linear"):
    from pipeline.models import build_token_classifier, resolve_model

    paddle.seed(3)
    return build_token_classifier(resolve_model(str(tiny_model_dir)), ["O", "B-PER", "I-PER"], head)


def test_layer_lr_multipliers_fall_by_the_decay_per_layer_below_the_head(tiny_model_dir):
    model = tiny_classifier(tiny_model_dir)
    multipliers = layer_lr_multipliers(model, 0.5)
    layers = model.bert.config["num_hidden_layers"]
    assert layers == 2
    assert multipliers["classifier.weight"] == multipliers["bert.pooler.dense.weight"] == 1.0
    assert multipliers["bert.encoder.layers.1.linear1.weight"] == 0.5  # the top layer
    assert multipliers["bert.encoder.layers.0.norm2.bias"] == 0.25
    assert multipliers["bert.embeddings.word_embeddings.weight"] == 0.125
    assert len(multipliers) == len(model.parameters())


def test_layer_lr_decay_changes_each_layers_first_adamw_step_by_its_multiplier(tiny_model_dir, tmp_path):
    """Adam's first step moves every weight by about lr * sign(gradient), whatever the gradient's size:
    with no weight decay, the mean step of each tensor is its multiplier times the learning rate. This
    checks the rates the optimiser really applies on CPU, not only the attributes set."""
    from pipeline.config import TrainConfig
    from pipeline.optim import build_optimizer

    steps = {}
    for decay in (1.0, 0.5):
        model = tiny_classifier(tiny_model_dir, head="crf")
        config = TrainConfig(model=str(tiny_model_dir), learning_rate=1e-3, warmup_ratio=0.0, weight_decay=0.0,
                             layer_lr_decay=decay, checkpoint_dir=str(tmp_path))
        optimizer, _ = build_optimizer(config, model, total_steps=10)
        build_optimizer(config, model, total_steps=10)  # a second build changes nothing (rates are set)
        before = {name: p.numpy().copy() for name, p in model.named_parameters()}
        ids = paddle.to_tensor(np.random.default_rng(0).integers(5, 30, size=(4, 9)))
        logits = model(ids)
        (1e3 * logits.square().mean() + model.crf.transitions.sum()).backward()
        grads = {name: np.abs(p.grad.numpy()) for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        # Where the gradient is well above Adam's epsilon (1e-8), the step is the rate itself.
        steps[decay] = {name: float(np.abs(p.numpy() - before[name])[grads[name] > 1e-6].mean())
                        for name, p in model.named_parameters() if name in grads and (grads[name] > 1e-6).any()}
    for name in ("bert.encoder.layers.1.linear1.weight", "bert.encoder.layers.0.self_attn.q_proj.weight",
                 "bert.embeddings.layer_norm.weight", "classifier.weight", "crf.transitions"):
        expected = layer_lr_multipliers(tiny_classifier(tiny_model_dir, head="crf"), 0.5)[name]
        assert steps[0.5][name] == pytest.approx(expected * steps[1.0][name], rel=0.02), name
    # The CRF's own multiplier (100) is kept: its transitions move 100x the learning rate.
    assert steps[0.5]["crf.transitions"] == pytest.approx(100 * 1e-3, rel=0.02)


def test_layer_lr_decay_needs_encoder_layers():
    with pytest.raises(ValueError, match="layer_lr_decay: no encoder layers found"):
        layer_lr_multipliers(two_layer_net(0), 0.8)
