"""Cost of the non-matmul kernels of one m3e-small training step, against one FFN matmul.

    python -m bench.op_costs [--batch 16] [--seq 46] [--reps 30]

Times forward and forward+backward (paddle.grad with a given output gradient)
of the element-wise kernels a BERT layer runs at the shapes of one training
batch, next to the FFN's first matmul, with the same thread settings as
training (pipeline.cpu_env). It answers "where does the step spend the time
the matmul floor does not count" (BENCHMARKS.md); the figures are per call,
and a 4-layer step calls each once per layer.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from pipeline.cpu_env import apply_cpu_settings


def per_call_ms(function, reps: int) -> float:
    """Mean milliseconds per call after one warm-up call (allocations and kernel choice excluded)."""
    function()  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    for _ in range(reps):
        function()
    return (time.perf_counter() - start) / reps * 1e3


def main(argv=None) -> int:
    """Time each kernel at the given shapes and print one line per kernel."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=46, help="tokens per sentence (a typical MSRA batch: 46)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    applied = apply_cpu_settings()
    import paddle
    import paddle.nn.functional as F

    b, s, h, i = args.batch, args.seq, args.hidden, args.intermediate
    hidden = paddle.randn([b, s, h])
    inner = paddle.randn([b, s, i])
    inner.stop_gradient = False
    inner_grad = paddle.ones_like(inner)
    scores = paddle.randn([b, args.heads, s, s])
    weight = paddle.randn([h, i])
    flat = paddle.randn([b * s, h])

    def forward_and_grad(op):
        return lambda: paddle.grad([op(inner)], [inner], [inner_grad])

    def gelu_grad_composed():  # exact GELU's gradient from Paddle's own erf/exp/multiply kernels
        cdf = 0.5 * (1.0 + paddle.erf(inner * (1 / math.sqrt(2))))
        pdf = paddle.exp(-0.5 * inner * inner) * (1 / math.sqrt(2 * math.pi))
        return inner_grad * (cdf + inner * pdf)

    from pipeline.linear_grad import install_matmul_bias_grad

    linear_in = paddle.randn([b, s, h])
    linear_in.stop_gradient = False
    ffn_in = paddle.nn.Linear(h, i)
    ffn_in_matmul_bias = paddle.nn.Linear(h, i)
    install_matmul_bias_grad(ffn_in_matmul_bias)

    def linear_forward_and_grad(layer):
        return lambda: paddle.grad([layer(linear_in)], [linear_in, layer.weight, layer.bias], [inner_grad])

    from pipeline import native_layer_norm

    normed = paddle.randn([b, s, h])
    normed.stop_gradient = False
    norm_weight, norm_bias = paddle.rand([h]) + 0.5, paddle.randn([h])
    norm_weight.stop_gradient = norm_bias.stop_gradient = False
    normed_grad = paddle.randn([b, s, h])

    def layer_norm_forward_and_grad(layer_norm):
        return lambda: paddle.grad([layer_norm(normed, norm_weight, norm_bias, 1e-12)],
                                   [normed, norm_weight, norm_bias], [normed_grad])

    rows = [
        (f"matmul [{b * s},{h}] @ [{h},{i}] (FFN in, forward)", lambda: paddle.matmul(flat, weight)),
        ("Linear (FFN in), forward + backward, Paddle's", linear_forward_and_grad(ffn_in)),
        ("Linear (FFN in), forward + backward, bias gradient as a matmul (pipeline/linear_grad.py)",
         linear_forward_and_grad(ffn_in_matmul_bias)),
        (f"GELU exact, forward [{b},{s},{i}]", lambda: F.gelu(inner)),
        ("GELU exact, forward + backward", forward_and_grad(F.gelu)),
        ("GELU exact, backward only, composed of erf/exp/multiply kernels", gelu_grad_composed),
        ("GELU tanh approximation, forward + backward", forward_and_grad(lambda x: F.gelu(x, approximate=True))),
        ("ReLU, forward + backward (an element-wise reference)", forward_and_grad(F.relu)),
        ("x * 1.1, forward + backward (an element-wise reference)", forward_and_grad(lambda x: x * 1.1)),
        (f"dropout 0.1 [{b},{s},{h}]", lambda: F.dropout(hidden, 0.1, training=True)),
        (f"dropout 0.1 attention probabilities [{b},{args.heads},{s},{s}]",
         lambda: F.dropout(scores, 0.1, training=True)),
        (f"layer norm [{b},{s},{h}]", lambda: F.layer_norm(hidden, h)),
        ("layer norm, forward + backward, Paddle's",
         layer_norm_forward_and_grad(lambda x, w, bias, eps: F.layer_norm(x, x.shape[-1], w, bias, eps))),
    ]
    if native_layer_norm.native_ops() is not None:  # built (or loaded) here, before any timing
        rows.append(("layer norm, forward + backward, our C++ operator (pipeline/native_layer_norm.py)",
                     layer_norm_forward_and_grad(native_layer_norm.layer_norm)))
    print(f"threads: {applied or 'as set in the environment'}")
    for name, function in rows:
        print(f"{per_call_ms(function, args.reps):8.2f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
