"""Our C++ layer norm: Paddle's outputs and gradients, where it runs, its build cache and its fallback."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from helpers import every_layer_runs, make_trainer
from pipeline import native_layer_norm
from pipeline.models import build_token_classifier, resolve_model

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
ROOT = Path(__file__).resolve().parents[1]


def test_the_operator_builds_on_this_machine():
    # Training falls back to Paddle's layer norm without a build; the tests need one
    # (g++: scripts/setup.sh installs it where it can).
    assert native_layer_norm.native_ops() is not None, "no native layer norm: is g++ installed?"


def _inputs(shape, seed, offset=0.0):
    paddle.seed(seed)
    x = paddle.randn(shape) * 3 + offset
    x.stop_gradient = False
    width = shape[-1]
    weight = paddle.create_parameter([width], "float32")
    bias = paddle.create_parameter([width], "float32", is_bias=True)
    weight.set_value(paddle.rand([width]) + 0.5)
    bias.set_value(paddle.randn([width]))
    return x, weight, bias, paddle.randn(shape)


@pytest.mark.parametrize("shape, offset", [([3, 7, 32], 0.0), ([40, 512], 0.0), ([2, 5, 64], 1000.0), ([0, 16], 0.0)],
                         ids=["batch", "m3e-width", "large-mean", "empty"])
def test_outputs_and_gradients_are_paddles(shape, offset):
    """Same values as Paddle's layer_norm and its gradients, to float32 rounding (sums in another order)."""
    x, weight, bias, upstream = _inputs(shape, seed=1, offset=offset)
    expected = F.layer_norm(x, shape[-1:], weight, bias, 1e-12)
    expected_grads = paddle.grad([expected], [x, weight, bias], [upstream])
    ours = native_layer_norm.layer_norm(x, weight, bias, 1e-12)
    grads = paddle.grad([ours], [x, weight, bias], [upstream])
    assert ours.shape == expected.shape
    # Against the float64 result: at a mean of 1000 float32 keeps 6e-5 of x, and Paddle's own output is off by 4e-5.
    x64 = x.numpy().astype(np.float64)
    exact = ((x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-12) * weight.numpy()
             + bias.numpy())
    np.testing.assert_allclose(ours.numpy(), exact, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("x", "weight", "bias"), grads, expected_grads):
        scale = max(1.0, float(np.abs(want.numpy()).max())) if want.size else 1.0
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=2e-5 * scale, err_msg=name)


def test_a_strided_view_is_read_as_its_values():
    """The kernels index raw memory row by row: a transposed view must give what a dense copy of it gives."""
    base = paddle.randn([32, 3, 7])
    base.stop_gradient = False
    view = base.transpose([1, 2, 0])
    _, weight, bias, upstream = _inputs([3, 7, 32], seed=3)
    dense = paddle.to_tensor(view.numpy())
    dense.stop_gradient = False
    ours = native_layer_norm.layer_norm(view, weight, bias, 1e-12)
    (grad,) = paddle.grad([ours], [base], [upstream])
    expected = native_layer_norm.layer_norm(dense, weight, bias, 1e-12)
    (expected_grad,) = paddle.grad([expected], [dense], [upstream])
    np.testing.assert_array_equal(ours.numpy(), expected.numpy())
    np.testing.assert_array_equal(grad.numpy(), expected_grad.numpy().transpose([2, 0, 1]))


def test_the_input_gradient_is_right_with_frozen_weight_and_bias():
    """Against the float64 formula. (Paddle 3.3.1's CPU layer_norm_grad gets this one wrong when neither
    weight nor bias needs a gradient: 0.59 off on a [2, 8] input, checked by finite differences.)"""
    x, weight, bias, upstream = _inputs([4, 9, 16], seed=4)
    weight.stop_gradient = bias.stop_gradient = True
    (grad,) = paddle.grad([native_layer_norm.layer_norm(x, weight, bias, 1e-5)], [x], [upstream])
    x64, w64, g64 = (t.numpy().astype(np.float64) for t in (x, weight, upstream))
    rstd = 1 / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    normed = (x64 - x64.mean(-1, keepdims=True)) * rstd
    scaled = g64 * w64
    exact = rstd * (scaled - scaled.mean(-1, keepdims=True) - normed * (scaled * normed).mean(-1, keepdims=True))
    np.testing.assert_allclose(grad.numpy(), exact, rtol=0, atol=2e-5)


def test_epsilon_is_added_to_the_variance_inside_the_root():
    """A constant row has variance 0: the output is the bias, and epsilon decides nothing else."""
    x, weight, bias, _ = _inputs([4, 16], seed=2)
    x = paddle.full([4, 16], 2.5)
    for epsilon in (1e-5, 1e-12):
        np.testing.assert_allclose(native_layer_norm.layer_norm(x, weight, bias, epsilon).numpy(),
                                   F.layer_norm(x, [16], weight, bias, epsilon).numpy(), atol=1e-6)
    y = paddle.randn([4, 16]) * 0.01  # variance 1e-4: Paddle's largest epsilon, 1e-3, shrinks the output about 3x
    shrunk = native_layer_norm.layer_norm(y, weight, bias, 1e-3).numpy()
    np.testing.assert_allclose(shrunk, F.layer_norm(y, [16], weight, bias, 1e-3).numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(shrunk - bias.numpy()).max() < 0.6 * np.abs(
        native_layer_norm.layer_norm(y, weight, bias, 1e-12).numpy() - bias.numpy()).max()


def _model(tiny_model_dir, seed=4):
    paddle.seed(seed)
    return build_token_classifier(resolve_model(str(tiny_model_dir)), LABELS)


def test_every_layer_norm_of_a_token_classifier_uses_it_in_training_only(tiny_model_dir, monkeypatch):
    calls = []
    own = native_layer_norm.layer_norm

    def counting(x, weight, bias, epsilon):
        calls.append(tuple(x.shape))
        return own(x, weight, bias, epsilon)

    monkeypatch.setattr(native_layer_norm, "layer_norm", counting)
    model = _model(tiny_model_dir)
    reference = _model(tiny_model_dir)  # the same weights, Paddle's layer norm
    installed = native_layer_norm.install_native_layer_norm(model)
    assert installed == 1 + 2 * 2  # the embeddings', and two per encoder layer of the tiny model
    ids = paddle.randint(5, 60, [3, 7])
    model.eval(), reference.eval()
    np.testing.assert_array_equal(model(ids).numpy(), reference(ids).numpy())  # evaluation: Paddle's, exactly
    assert calls == []
    model.train()
    paddle.seed(5)
    model(ids)
    assert len(calls) == installed and all(shape == (3, 7, 32) for shape in calls), calls


@pytest.mark.parametrize("static", [False, True], ids=["eager", "to_static"])
def test_a_model_trains_through_it_like_through_paddles_eager_and_to_static(tiny_model_dir, static):
    """Dropout off: ours and Paddle's layer norm take the same steps, with varying batch shapes."""
    losses = {}
    for use_it in (False, True):
        model = _model(tiny_model_dir, seed=6)
        for layer in model.sublayers():
            if isinstance(layer, paddle.nn.Dropout):
                layer.p = 0.0
        if use_it:
            assert native_layer_norm.install_native_layer_norm(model) == 5
        model.train()
        optimizer = paddle.optimizer.AdamW(1e-3, parameters=model.parameters())

        def loss_of(ids, gold):
            logits = model(ids)
            return F.cross_entropy(logits.reshape([-1, len(LABELS)]), gold.reshape([-1]))

        step = paddle.jit.to_static(loss_of, full_graph=False) if static else loss_of
        paddle.seed(7)
        batches = [(paddle.randint(5, 60, [4, n]), paddle.randint(0, len(LABELS), [4, n])) for n in (5, 9, 6, 9)]
        losses[use_it] = []
        for ids, gold in batches:
            loss = step(ids, gold)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses[use_it].append(float(loss))
    assert all(np.isfinite(losses[True]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][-1] != losses[True][1]  # the weights moved: the 9-token batch's loss changed


def _uses_it(model) -> bool:
    return every_layer_runs(model, paddle.nn.LayerNorm, native_layer_norm._layer_norm_forward)


def test_the_trainer_uses_it_on_cpu_float32_only_when_asked(tiny_model_dir, tiny_dataset_dir, tmp_path):
    on = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "on", max_steps=2, do_test=False)
    assert np.isfinite(on.fit().best_metric)
    assert _uses_it(on.model)
    off = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "off", max_steps=1, do_test=False,
                       native_layer_norm=False)
    off.fit()
    assert not _uses_it(off.model)
    bf16 = make_trainer(tiny_model_dir, tiny_dataset_dir, tmp_path / "bf16", max_steps=1, do_test=False, amp="bf16")
    bf16.fit()
    assert not _uses_it(bf16.model)


def test_without_a_build_it_warns_once_and_leaves_paddles_layer_norm(tiny_model_dir, monkeypatch, caplog):
    def no_compiler(directory):
        raise RuntimeError("command 'c++' failed: No such file or directory")

    monkeypatch.setattr(native_layer_norm, "_build_and_load", no_compiler)
    monkeypatch.setattr(native_layer_norm, "_ops", native_layer_norm._UNTRIED)
    model = _model(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="pipeline.native_layer_norm"):
        assert native_layer_norm.install_native_layer_norm(model) == 0
        assert native_layer_norm.install_native_layer_norm(_model(tiny_model_dir)) == 0
    warnings = [r.getMessage() for r in caplog.records if "native layer norm unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "No such file or directory" in warnings[0]
    assert not _uses_it(model)


def test_the_build_is_keyed_by_source_and_processor(monkeypatch, tmp_path):
    monkeypatch.setenv("NERPIPE_HOME", str(tmp_path))
    here = native_layer_norm.build_directory()
    assert here.parent == tmp_path / "native"
    monkeypatch.setattr(native_layer_norm, "_cpu_flags", lambda: "fpu sse sse2 avx2")
    elsewhere = native_layer_norm.build_directory()
    assert elsewhere != here
    source = tmp_path / "layer_norm.cc"
    source.write_text(native_layer_norm.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(native_layer_norm, "SOURCE", source)
    assert native_layer_norm.build_directory() not in (here, elsewhere)


CONCURRENT_LOAD = """
import sys
sys.path.insert(0, {root!r})
import paddle
from pipeline import native_layer_norm
x = paddle.randn([6, 8]); w = paddle.ones([8]); b = paddle.zeros([8])
y = native_layer_norm.layer_norm(x, w, b, 1e-5)
expected = paddle.nn.functional.layer_norm(x, [8], w, b, 1e-5)
print(float((y - expected).abs().max()))
"""


@pytest.mark.slow
def test_workers_starting_together_share_one_build(tmp_path):
    """Two processes with an empty cache: one compiles, the other waits on the lock and loads the build."""
    env = dict(os.environ, NERPIPE_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    code = CONCURRENT_LOAD.format(root=str(ROOT))
    workers = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
        assert float(out.strip().splitlines()[-1]) < 1e-5
    builds = list((tmp_path / "native").iterdir())
    assert len(builds) == 1 and (builds[0] / "built").exists()
    assert len(list(builds[0].rglob("*.so"))) == 1
