"""Linear layers whose bias gradient is a matrix product, for CPU training in float32.

Paddle 3.3 on CPU reduces the output gradient over all rows for a Linear's
bias with a kernel slower than the layer's own matrix products, while MKL's
matmul does the same sum quickly (``python -m bench.op_costs`` times both at
the shapes of a training batch). The bias enters through an outer product
with a column of ones, so autograd computes its gradient as ``ones^T @ dy``
(a matmul) and the sum of the two products has an ordinary same-shape
gradient. ``1 * b`` is exact, so the output is the same; the gradients are
the same sums in MKL's order.

Plain autograd, so it runs inside to_static programs. Installed by the
trainer for CPU float32 training only (``matmul_bias_grad``); saved weights
are untouched, so export and predict.py use Paddle's Linear.
"""
from __future__ import annotations

import types

import paddle
from paddle import nn


def _linear_with_matmul_bias_grad(self, x):
    """``x @ W + ones @ b``: Linear's output, with the bias gradient computed as a matmul."""
    ones = paddle.ones_like(x[..., :1])  # [..., 1]; no gradient flows into it
    return paddle.matmul(x, self.weight) + paddle.matmul(ones, self.bias.unsqueeze(0))


def install_matmul_bias_grad(model) -> int:
    """Give every ``nn.Linear`` with a bias in ``model`` the forward above; return how many."""
    linears = [layer for layer in model.sublayers(include_self=True)
               if isinstance(layer, nn.Linear) and layer.bias is not None]
    for layer in linears:
        layer.forward = types.MethodType(_linear_with_matmul_bias_grad, layer)
    return len(linears)
