"""Dropout whose masks come from random integers, for CPU training in float32.

Paddle 3.3's CPU dropout kernel draws one float from a 64-bit Mersenne Twister per element, on one
thread: 2.8 ms for one [16, 37, 512] activation on the machines we measure, 14 calls a training step
of m3e-small, about a seventh of the step once MKL's AVX-512 path runs the matrix products
(BENCHMARKS.md, 2026-12-07, night). ``paddle.randint`` draws from the same generator but several
times faster per element, so here a mask is ``randint(0, 2**24) >= round(p * 2**24)``: an element is
dropped with probability p to within 2**-24, and kept elements are scaled by 1 / (1 - p), as Paddle's
``upscale_in_train`` mode does. The gradient is the output gradient times the same scaled mask.

The draws differ from Paddle's kernel, so the masks (and the trained weights) differ from a run
without this; seeding and resuming work as before, because the draws come from Paddle's generator,
whose state the training states save. Plain Paddle operators, so it runs inside to_static programs.

Installed by the trainer for CPU float32 training only (``dropout_masks_from_integers``): on a GPU
Paddle's kernel is fast. Every ``nn.Dropout`` of the model gets the forward below; the attention
weights' dropout is a call to ``paddle.nn.functional.dropout`` inside Paddle's ``MultiHeadAttention``,
reached through the ``F`` of ``paddle.nn.layer.transformer``, which is swapped for a copy of
``paddle.nn.functional`` whose ``dropout`` is the one below (for that module, in this process).
"""
from __future__ import annotations

import types

import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.nn.layer import transformer as paddle_transformer

MASK_BITS = 24  # a float32 holds every integer below 2**24 exactly; the keep probability is exact to 2**-24
_paddle_dropout = F.dropout


def dropout(x, p=0.5, axis=None, training=True, mode="upscale_in_train", name=None, **kwargs):
    """``paddle.nn.functional.dropout`` with integer-drawn masks where that is what it would compute.

    Anything else (evaluation, p of 0 or 1, an axis, the ``downscale_in_infer`` mode, an in-place
    request, a non-float32 input) goes to Paddle's own function unchanged.
    """
    if (not training or axis is not None or mode != "upscale_in_train" or kwargs.get("inplace")
            or not 0.0 < float(p) < 1.0 or x.dtype != paddle.float32):
        return _paddle_dropout(x, p=p, axis=axis, training=training, mode=mode, name=name, **kwargs)
    threshold = round(float(p) * (1 << MASK_BITS))
    # Inside a to_static program a dimension may be unknown until run time (x.shape holds -1 there).
    shape = x.shape if paddle.in_dynamic_mode() else paddle.shape(x)
    draws = paddle.randint(0, 1 << MASK_BITS, shape, dtype="int32")
    keep = (draws >= threshold).astype(x.dtype) * (1.0 / (1.0 - float(p)))
    return x * keep


def _dropout_layer_forward(self, input):
    return dropout(input, p=self.p, axis=self.axis, training=self.training, mode=self.mode, name=self.name,
                   inplace=getattr(self, "inplace", False))


def _functional_with_integer_masks() -> types.ModuleType:
    """A copy of ``paddle.nn.functional`` whose ``dropout`` is the one above."""
    functional = types.ModuleType(F.__name__, F.__doc__)
    functional.__dict__.update({k: v for k, v in vars(F).items() if k not in ("__name__", "__doc__")})
    functional.dropout = dropout
    return functional


def install_dropout_masks_from_integers(model) -> int:
    """Give ``model``'s dropout layers, and Paddle's attention, the dropout above; return how many layers."""
    layers = [layer for layer in model.sublayers(include_self=True) if type(layer) is nn.Dropout]
    for layer in layers:
        layer.forward = types.MethodType(_dropout_layer_forward, layer)
    if paddle_transformer.F.dropout is not dropout:
        paddle_transformer.F = _functional_with_integer_masks()
    return len(layers)


def uninstall_from_attention() -> None:
    """Give Paddle's attention its own dropout back: the trainer, when this is off, and tests (layers keep theirs)."""
    paddle_transformer.F = F
