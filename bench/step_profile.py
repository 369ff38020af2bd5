"""Paddle's profiler over training steps of m3e-small: where a step's time goes, per operator.

    python -m bench.step_profile [--batch 16] [--seq 46] [--steps 5]
    NERPIPE_MALLOC=default python -m bench.step_profile      # without cpu_env's malloc setting
    python -m bench.step_profile --no-matmul-bias-grad       # Paddle's own Linear bias gradient
    python -m bench.step_profile --paddle-dropout-and-layer-norm   # Paddle's own dropout and layer norm

One process, the same CPU settings as training (pipeline.cpu_env), the offline
m3e-small token classifier, a random batch of the given shape, the forward
through paddle.jit.to_static as the trainer runs it with its CPU measures
(matmul bias gradients, integer-drawn dropout masks, our layer norm), AdamW; 3 warm-up steps,
then --steps profiled. Prints the profiler's per-operator summary (sorted by
total CPU time); divide by --steps for per-step figures. BENCHMARKS.md quotes it.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cpu_env import apply_cpu_settings

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def main(argv=None) -> int:
    """Profile ``--steps`` training steps after 3 warm-up steps and print Paddle's per-operator summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=46, help="tokens per sentence (a typical MSRA batch: 46)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--model", default="m3e-small", help="model name or directory (default: m3e-small)")
    parser.add_argument("--no-matmul-bias-grad", action="store_true", help="leave Paddle's Linear as it is")
    parser.add_argument("--paddle-dropout-and-layer-norm", action="store_true",
                        help="leave Paddle's dropout and layer norm kernels (the trainer replaces both on CPU)")
    args = parser.parse_args(argv)
    print(f"cpu settings: {apply_cpu_settings()}")
    import paddle
    import paddle.profiler as profiler

    from pipeline.amp import AmpPolicy
    from pipeline.config import TrainConfig
    from pipeline.dropout_masks import install_dropout_masks_from_integers
    from pipeline.linear_grad import install_matmul_bias_grad
    from pipeline.native_layer_norm import install_native_layer_norm
    from pipeline.models import build_token_classifier, resolve_model
    from pipeline.trainer import LossOfBatch

    paddle.seed(0)
    model = build_token_classifier(resolve_model(args.model), LABELS)
    model.train()
    if not args.no_matmul_bias_grad:
        print(f"matmul bias gradients in {install_matmul_bias_grad(model)} Linear layers")
    if not args.paddle_dropout_and_layer_norm:  # as the trainer does on CPU in float32
        print(f"integer-drawn dropout masks in {install_dropout_masks_from_integers(model)} Dropout layers "
              "and the attention; our C++ layer norm in "
              f"{install_native_layer_norm(model)} LayerNorm layers")
    vocab = next(layer for layer in model.sublayers() if isinstance(layer, paddle.nn.Embedding)).weight.shape[0]
    input_ids = paddle.randint(min(100, vocab // 2), vocab, [args.batch, args.seq])  # no special tokens
    labels = paddle.randint(0, len(LABELS), [args.batch, args.seq])
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-5, parameters=model.parameters(), weight_decay=0.01)

    loss_of = LossOfBatch(model, AmpPolicy(TrainConfig()), to_static=True)  # the trainer's forward and loss

    def step():
        loss_of(input_ids, labels).backward()
        optimizer.step()
        optimizer.clear_grad()

    for _ in range(3):
        step()
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], scheduler=(1, args.steps + 1))
    prof.start()
    for _ in range(args.steps + 1):
        step()
        prof.step()
    prof.stop()
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
