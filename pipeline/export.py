"""Export a checkpoint's token classifier as a static inference model for Paddle Inference.

    python -m pipeline.export --checkpoint outputs/msra_quick/best_model --output outputs/msra_quick/inference

writes ``OUTPUT/inference.json`` (or ``inference.pdmodel`` with the legacy IR) and
``OUTPUT/inference.pdiparams`` with ``paddle.jit.save``: one input, ``input_ids``
int64 ``[batch, seq]`` (any batch size and length up to the encoder's position
table), one output, the logits ``[batch, seq, classes]``. Padding is read from
``input_ids`` by the encoder itself, as in the dynamic graph.

Beside them ``export.json`` records the sha256 of the checkpoint's
``model.pdparams`` (and ``pipeline.checkpoint.weights_digest``), so that a
predictor can tell an export made from other weights (a stale one) and refuse it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .predictor import INFERENCE_DIR_NAME
from .static_export import EXPORT_META_FILE, export_inference_model, model_files


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best_model/ directory written by train_dist.py")
    parser.add_argument("--output", default=None,
                        help="directory to write (default: CHECKPOINT/inference, which predict.py finds by itself)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .cpu_env import apply_cpu_settings

    apply_cpu_settings()  # before Paddle is imported
    from .checkpoint import CheckpointError

    output = Path(args.output) if args.output else Path(args.checkpoint) / INFERENCE_DIR_NAME
    try:
        written = export_inference_model(args.checkpoint, output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    files = model_files(written)
    print(f"exported {args.checkpoint} -> {files[0]} + {files[1].name} (meta: {written / EXPORT_META_FILE})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
