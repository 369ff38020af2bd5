"""Linear layers with matmul bias gradients: same outputs and gradients as Paddle's, in eager and to_static."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from helpers import make_trainer
from pipeline import linear_grad
from pipeline.linear_grad import install_matmul_bias_grad
from pipeline.models import build_token_classifier, resolve_model

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _linears_with_bias(model) -> list:
    return [layer for layer in model.sublayers(include_self=True)
            if isinstance(layer, paddle.nn.Linear) and layer.bias is not None]


def _installed(layer) -> bool:
    return getattr(layer.forward, "__func__", None) is linear_grad._linear_with_matmul_bias_grad


def test_one_linear_gives_paddles_output_and_gradients():
    paddle.seed(3)
    layer = paddle.nn.Linear(32, 64)
    x = paddle.randn([3, 5, 32])
    x.stop_gradient = False
    upstream = paddle.randn([3, 5, 64])
    expected = F.linear(x, layer.weight, layer.bias)
    expected_grads = paddle.grad([expected], [x, layer.weight, layer.bias], [upstream])
    assert install_matmul_bias_grad(layer) == 1 and _installed(layer)
    output = layer(x)
    grads = paddle.grad([output], [x, layer.weight, layer.bias], [upstream])
    np.testing.assert_array_equal(output.numpy(), expected.numpy())  # 1 * b is exact
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_linear_without_bias_is_left_alone():
    layer = paddle.nn.Linear(4, 4, bias_attr=False)
    assert install_matmul_bias_grad(layer) == 0 and not _installed(layer)


def _loss_and_grads(model, input_ids, labels, static: bool):
    def loss_of(ids, gold):
        logits = model(ids)
        return F.cross_entropy(logits.reshape([-1, len(LABELS)]), gold.reshape([-1]))

    loss = (paddle.jit.to_static(loss_of, full_graph=False) if static else loss_of)(input_ids, labels)
    loss.backward()
    grads = {name: param.grad.numpy().copy() for name, param in model.named_parameters() if param.grad is not None}
    model.clear_gradients()
    return float(loss), grads


@pytest.mark.parametrize("static", [False, True], ids=["eager", "to_static"])
def test_a_token_classifier_gets_the_same_loss_and_gradients(tiny_model_dir, static):
    spec = resolve_model(str(tiny_model_dir))
    paddle.seed(5)
    reference = build_token_classifier(spec, LABELS)
    paddle.seed(5)
    model = build_token_classifier(spec, LABELS)
    reference.eval(), model.eval()  # no dropout: the two models must see the same function
    input_ids = paddle.randint(5, 60, [4, 9])
    labels = paddle.randint(0, len(LABELS), [4, 9])
    expected_loss, expected_grads = _loss_and_grads(reference, input_ids, labels, static=False)

    assert install_matmul_bias_grad(model) == len(_linears_with_bias(model)) >= 13  # 2 layers x 6 + the head
    loss, grads = _loss_and_grads(model, input_ids, labels, static=static)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, expected_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_trainer_uses_it_on_cpu_float32_and_trains_to_the_same_weights(tiny_model_dir, tiny_dataset_dir,
                                                                           tmp_path):
    weights = {}
    for enabled in (True, False):
        trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / str(enabled), max_steps=3,
                               do_test=False, matmul_bias_grad=enabled)
        trainer.fit()
        linears = _linears_with_bias(trainer.model)
        assert linears and all(_installed(layer) == enabled for layer in linears)
        weights[enabled] = paddle.load(str(tmp_path / str(enabled) / "best_model" / "model.pdparams"))
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[True].items():
        np.testing.assert_allclose(tensor.numpy(), weights[False][name].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_the_trainer_leaves_it_out_under_amp(tiny_model_dir, tiny_dataset_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=1, do_test=False,
                           amp="bf16")
    trainer.fit()
    assert not any(_installed(layer) for layer in _linears_with_bias(trainer.model))
